"""``python -m jaxvla.serving --checkpoint=DIR``: see :mod:`jaxvla.serving.cli`."""

from jaxvla.serving.cli import main

if __name__ == "__main__":
    main()
