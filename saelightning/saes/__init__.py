"""SAE architectures as plain torch modules (usable without Lightning), built from an SAEConfig."""

from saelightning.saes.base import ARCHITECTURES, SAE, SAEConfig
from saelightning.saes.batchtopk import BatchTopKSAE
from saelightning.saes.crosscoder import CrossCoder, L1CrossCoder, OneModel
from saelightning.saes.gated import GatedSAE
from saelightning.saes.jumprelu import JumpReLUSAE
from saelightning.saes.latent import LatentShard
from saelightning.saes.matryoshka import MatryoshkaSAE
from saelightning.saes.relu import ReLUSAE
from saelightning.saes.topk import TopKSAE

SAE_CLASSES: dict[str, type[SAE]] = {
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "relu": ReLUSAE,
    "gated": GatedSAE,
    "jumprelu": JumpReLUSAE,
    "matryoshka": MatryoshkaSAE,
    "crosscoder": CrossCoder,
    "crosscoder_l1": L1CrossCoder,
}


def build_sae(config: SAEConfig, shard: LatentShard | None = None) -> SAE:
    """A freshly initialised SAE of config.architecture (the config was validated on construction); with a latent
    shard, only that rank's latents (the same numbers as those rows of the whole SAE's init)."""
    return SAE_CLASSES[config.architecture](config, shard)


__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "build_sae", "SAE_CLASSES", "TopKSAE", "BatchTopKSAE",
           "ReLUSAE", "GatedSAE", "JumpReLUSAE", "MatryoshkaSAE", "CrossCoder", "L1CrossCoder",
           "OneModel"]
