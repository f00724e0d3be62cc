"""The run-config keys sfedlora reads besides the experiment's own dotted keys. A module
with no imports: the ClientApp's thin front (:mod:`sfedlora.runtime.flower.client_app`)
reads them without loading torch."""

CONFIG_FILE_KEY = "config-file"
OVERRIDES_KEY = "overrides"
RESUME_KEY = "resume"  # a run directory to continue from its checkpoint
OVERWRITE_KEY = "overwrite"  # replace the run that output_dir holds
# Set by the simulation engine's runner: every virtual node runs the same ClientApp on
# one machine, so any node may serve any client (the message names it); see FlowerPool.
ANY_NODE_KEY = "any-node"
