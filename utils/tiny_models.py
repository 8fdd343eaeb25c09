"""Kept at this path for ``python -m utils.tiny_models --out_dir DIR [--arch A]``: see ``utils.demo.tiny_models``."""

from utils.demo.tiny_models import main, parse_args

if __name__ == "__main__":
    main(parse_args())
