"""`torchrun ... -m q_tuning.megatron_lm pretrain_gpt.py <its flags> --enable-q-tuning ...`"""

from q_tuning.megatron_lm import main

if __name__ == "__main__":
    main()
