"""The stage configs, shipped inside the package as ``jaxvla.configs`` (setup.py maps this directory
onto it). Each ``<stage>.py`` has ``get_config(variant)``; load one by path or by name:

    python -m jaxvla.train --config=configs/pretrain.py:vipra_small ...   # from the checkout
    python -m jaxvla.train --config=pretrain.py:vipra_small ...           # from any directory

``jaxvla.config.resolve_config_path`` does the lookup; ``jaxvla.config.load_config`` is the same in
Python.
"""
