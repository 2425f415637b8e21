"""Music continuation on EnCodec latents: a transformer predicts the next segment's latents, and every loss is
measured on the audio that the frozen EnCodec decoder makes of them.

Subpackages by job: data (audio reading, preparation, the latent cache, decoded references), losses (the
audio-space losses and the balancer), training (launcher, worker, checkpoints, logging), evaluation (scores,
listening metrics and pages), ablation (loss grids, executors, report). codec.py and model.py are the two
networks.
"""
__version__ = "0.1.0"
