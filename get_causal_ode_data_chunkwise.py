r"""The published chunk-wise ODE-data command: ``get_causal_ode_data.py`` with the chunk-wise Stage-1 config.

    torchrun --nproc_per_node=8 get_causal_ode_data_chunkwise.py \
        --generator_ckpt checkpoints/chunkwise/ar_diffusion.pt --rawdata_path dataset/clean_data \
        --output_folder dataset/ODE6KCausal_chunkwise_latents

Flags given on the command line win over the config set here; ``--help`` lists them all.
"""

import sys

from get_causal_ode_data import main

if __name__ == "__main__":
    sys.exit(main(["--config_path", "configs/ar_diffusion_tf_chunkwise.yaml", *sys.argv[1:]]))
