"""`python -m moe_lora_jax.cli ...` runs the `moe-lora` command."""

import sys

from moe_lora_jax.cli import main

sys.exit(main())
