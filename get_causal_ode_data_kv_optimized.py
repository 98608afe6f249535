"""The published KV-cache ODE-data script's name (its README calls it ``get_causal_ode_data_kv.py``): runs
``get_causal_ode_data.py``, which always uses the KV cache. ``--help`` lists every flag."""

import sys

from get_causal_ode_data import main

if __name__ == "__main__":
    sys.exit(main())
