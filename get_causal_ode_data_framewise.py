r"""The published frame-wise ODE-data command: ``get_causal_ode_data.py`` with the frame-wise Stage-1 config.

    torchrun --nproc_per_node=8 get_causal_ode_data_framewise.py \
        --generator_ckpt checkpoints/framewise/ar_diffusion.pt --rawdata_path dataset/clean_data \
        --output_folder dataset/ODE6KCausal_framewise_latents

Flags given on the command line win over the config set here; ``--help`` lists them all.
"""

import sys

from get_causal_ode_data import main

if __name__ == "__main__":
    sys.exit(main(["--config_path", "configs/ar_diffusion_tf_framewise.yaml", *sys.argv[1:]]))
