"""``python -m jaxvla.serve --checkpoint=DIR``: the policy server's CLI, kept under its old name.

Everything lives in :mod:`jaxvla.serving` (protocol in its docstring; ``codec``, ``server``,
``client``, ``cli``); this module only runs ``jaxvla.serving.cli.main``.
"""

from jaxvla.serving.cli import main

if __name__ == "__main__":
    main()
