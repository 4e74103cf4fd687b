"""dpdiff: differentially private fine-tuning of Stable Diffusion, with accounting, probes and audits."""

__version__ = "0.1.0"
