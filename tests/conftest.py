import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ["WANDB_MODE"] = "offline"  # no test may reach W&B's servers, whatever the shell says
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
