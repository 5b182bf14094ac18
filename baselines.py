"""Drop-in for DataComp's baselines.py, with the Sieve filters.

    python baselines.py --name sieve_clip --fraction 0.2 --metadata_dir POOL/metadata \
        --scores_dir POOL/sieve_scores --save_path subsets/sieve_clip.npy

Run ``python baselines.py --help`` for every name and flag.
"""

import sys

from datacomp_sieve.cli import baselines_main

if __name__ == "__main__":
    sys.exit(baselines_main())
