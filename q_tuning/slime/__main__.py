"""`python -m q_tuning.slime train.py <slime flags> --enable-q-tuning --q-tuning-...`"""

import sys

from q_tuning.slime.launcher import main

sys.exit(main())
