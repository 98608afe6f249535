r"""The published README's KV-cache ODE-data command: ``get_causal_ode_data.py``, which always uses the KV cache.

    torchrun --nproc_per_node=8 get_causal_ode_data_kv.py --generator_ckpt checkpoints/chunkwise/ar_diffusion.pt \
        --rawdata_path dataset/clean_data --output_folder dataset/ODE6KCausal_chunkwise_latents \
        --num_frames_per_chunk 3 --generation_mode blockwise_kv      # 1 for frame-wise

``--help`` lists every flag.
"""

import sys

from get_causal_ode_data import main

if __name__ == "__main__":
    sys.exit(main())
