"""Write the quickstart's synthetic word problems (``utils.demo.synthetic``) in the GSM8K record format.

    python dataset/synthetic.py --out_dir DIR [--num_train 2000] [--num_test 500] [--seed 0]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as ``python dataset/synthetic.py``

from utils.demo.synthetic import main, parse_args  # noqa: E402

if __name__ == "__main__":
    main(parse_args())
