"""Pure-torch models (no Lightning, no file IO): stage-1 VQ-GAN autoencoder and its parts."""

from medsynth.models.autoencoder_config import PRESETS, DiscriminatorConfig, VQGANConfig, preset
from medsynth.models.discriminator import PatchDiscriminator3d
from medsynth.models.quantizer import GroupedVectorQuantizer, QuantizerOutput, VectorQuantizer
from medsynth.models.tiling import decode_tiled, encode_tiled, reconstruct_tiled
from medsynth.models.vqgan import VQGAN

__all__ = ["VQGAN", "VQGANConfig", "DiscriminatorConfig", "PatchDiscriminator3d", "VectorQuantizer",
           "GroupedVectorQuantizer", "QuantizerOutput", "PRESETS", "preset", "encode_tiled", "decode_tiled", "reconstruct_tiled"]
