"""Kept at this path for ``python -m utils.real_models --out_dir DIR``: see ``utils.demo.real_models``."""

from utils.demo.model_files import RealModelError
from utils.demo.real_models import main, parse_args

if __name__ == "__main__":
    try:
        main(parse_args())
    except RealModelError as error:
        raise SystemExit(f"error: {error}")
