"""Latent generation (docs/method.md, the paper's recipes: ImageNet 256): images -> VAE
posterior shards -> MeanFlow in latent space -> decoded images.

* :func:`prepare_latents` (``meanflow prepare-latents``) encodes an image folder into shards
  (format: :mod:`meanflow.data.latents`) plus FID reference statistics of the same images;
* :class:`meanflow.data.LatentShards` draws ``(mean + std * e - shift) * scale`` with labels for
  training (``shift``: the VAE's ``shift_factor``, 0 for SD-VAE);
* :func:`decode_latents` turns model samples back into images: ``meanflow.load(run).sample(n)``
  (:mod:`meanflow.runs.load`) decodes a latent run's samples with the VAE recorded with its
  latents, and ``meanflow fid calc`` (:func:`meanflow.metrics.fid.fid_of`) scores them.

Everything touching the VAE needs the optional dependency ``diffusers``.
"""

from meanflow.latents.prepare import (DTYPES, FID_REF_NAME, prepare_latents, read_cropped,
                                      shard_assignment, stats_from_shards)
from meanflow.latents.vae import (DIFFUSERS_INSTALL, SD_VAE_SCALE, decode_latents,
                                  encode_posterior, latent_shape, load_vae, vae_identity,
                                  vae_shift)

__all__ = ["prepare_latents", "shard_assignment", "read_cropped", "stats_from_shards",
           "FID_REF_NAME", "DTYPES", "load_vae", "vae_identity", "encode_posterior",
           "decode_latents", "latent_shape", "vae_shift", "SD_VAE_SCALE", "DIFFUSERS_INSTALL"]
