"""sfedlora: federated LoRA fine-tuning with SFed-LoRA and the methods it is compared against."""

__version__ = "0.1.0"
