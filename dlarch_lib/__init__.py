"""dlarch_lib: the small shared library behind the *dlarch* textbook.

Two layers, one idea per module. The **core** is what every chapter uses and no chapter teaches:

- :mod:`dlarch_lib.core.runtime`   ``setup``: seed, device (``RUN.device``), run size; ``seeded``
- :mod:`dlarch_lib.core.hardware`  what hardware is present; the cell-tag gating rules
- :mod:`dlarch_lib.core.data`      offline datasets (handwritten digits) as tensors and loaders
- :mod:`dlarch_lib.core.text`      offline text corpora for the language models
- :mod:`dlarch_lib.core.train`     the one training engine: ``fit(model, data, step)`` -> ``History``
- :mod:`dlarch_lib.core.measure`   parameters, FLOPs, and the one timer (``timings_ms``)
- :mod:`dlarch_lib.core.viz`       plotting helpers and ``show`` (render a library object's source)
- :mod:`dlarch_lib.core.notebook`  the standard setup cell, ``glue`` for numbers in prose, ``verdict`` for claims

The **chapter modules** hold what each chapter teaches. A chapter module imports the core and the
modules of earlier chapters only (``tests/test_layout.py`` enforces it)::

    ch  module                           what it holds
 1  :mod:`dlarch_lib.approx`                universal approximation, the five-tuple of a network
 2  :mod:`dlarch_lib.modular`               blocks, registries, configs, the one MLP builder
 3  :mod:`dlarch_lib.residual`              residual blocks, degradation
 4  :mod:`dlarch_lib.cnn`                   convolution by hand, the small ResNet
 5  :mod:`dlarch_lib.rnn`                   the LSTM cell by hand, character LMs
 6  :mod:`dlarch_lib.attention`             scaled dot-product and multi-head attention, the GPT
 7  :mod:`dlarch_lib.sparse_attention`      cross, local and sparse attention
 8  :mod:`dlarch_lib.gan`                   GAN losses, DCGAN, StyleGAN pieces
 9  :mod:`dlarch_lib.seq2seq`               encoder-decoder, Bahdanau/Luong attention, beam search
10  :mod:`dlarch_lib.shapes`                procedural shapes with masks and boxes (chapters 10, 25)
10  :mod:`dlarch_lib.unet`                  U-Net, IoU
11  :mod:`dlarch_lib.siamese`               Siamese networks, contrastive and triplet losses
12  :mod:`dlarch_lib.distill`               knowledge distillation
13  :mod:`dlarch_lib.quant`                 quantization, ONNX export and ONNX Runtime
14  :mod:`dlarch_lib.prune`                 pruning
15  :mod:`dlarch_lib.nas`                   architecture search: the search core, REINFORCE, evolution (15, 16)
15  :mod:`dlarch_lib.supernet`              weight sharing: a supernet of the digits space, its proxy's rank fidelity
16  :mod:`dlarch_lib.pareto`                two objectives: Pareto fronts, hypervolume, NSGA-II, local search
17  :mod:`dlarch_lib.hpo`                   hyperparameter search: Bayesian optimisation
18  :mod:`dlarch_lib.parallel`              data parallelism (DDP), the launcher
18  :mod:`dlarch_lib.sharding`              sharded data parallelism (ZeRO, FSDP2), gradient compression
19  :mod:`dlarch_lib.pipeline`              pipeline and tensor parallelism
20  :mod:`dlarch_lib.deploy`                deployment: graph optimisation, TensorRT
21  :mod:`dlarch_lib.complexity`            parameters, FLOPs and memory in closed form
22  :mod:`dlarch_lib.bench`                 benchmarking: throughput, the roofline
23  :mod:`dlarch_lib.nerf`                  neural radiance fields
24  :mod:`dlarch_lib.efficientnet`          image classification: MBConv, compound scaling
25  :mod:`dlarch_lib.detect`                object detection
26  :mod:`dlarch_lib.lm`                    language models: GPT, MLM
26  :mod:`dlarch_lib.bpe`                   byte-level byte-pair encoding (the GPT-2 tokenizer)
27  :mod:`dlarch_lib.vae`                   the VAE
27  :mod:`dlarch_lib.diffusion`             a tiny DDPM: closed-form noising, a denoiser, ancestral sampling
28  :mod:`dlarch_lib.techniques`            training techniques: schedules, normalisation, regularisation
29  :mod:`dlarch_lib.frameworks`            frameworks: JAX, Keras 3, torch.compile
30  :mod:`dlarch_lib.frontier`              the outlook: FlashAttention, mixture of experts, SSMs, DDIM, DPO

Conventions: a model is moved once to ``RUN.device`` and every function takes the device from the
model; library functions draw randomness from a ``torch.Generator`` the caller passes or inside
``seeded(seed)``, never reseeding the caller's generators; a top-level name has one meaning.
"""

from dlarch_lib.core.notebook import glue, verdict
from dlarch_lib.core.runtime import RunConfig, pick_device, require, run_size, seed_everything, seeded, setup
from dlarch_lib.core.viz import show

__version__ = "0.1.0"

CHAPTER_OF: dict[str, int] = {
    "approx": 1,
    "modular": 2,
    "residual": 3,
    "cnn": 4,
    "rnn": 5,
    "attention": 6,
    "sparse_attention": 7,
    "gan": 8,
    "seq2seq": 9,
    "unet": 10,
    "shapes": 10,
    "siamese": 11,
    "distill": 12,
    "quant": 13,
    "prune": 14,
    "nas": 15,
    "supernet": 15,
    "pareto": 16,
    "hpo": 17,
    "parallel": 18,
    "sharding": 18,
    "pipeline": 19,
    "deploy": 20,
    "complexity": 21,
    "bench": 22,
    "nerf": 23,
    "efficientnet": 24,
    "detect": 25,
    "lm": 26,
    "bpe": 26,
    "vae": 27,
    "diffusion": 27,
    "techniques": 28,
    "frameworks": 29,
    "frontier": 30,
}
"""Chapter module -> the chapter that teaches it (the layer it sits in)."""

__all__ = [
    "CHAPTER_OF",
    "RunConfig",
    "glue",
    "verdict",
    "pick_device",
    "require",
    "run_size",
    "seed_everything",
    "seeded",
    "setup",
    "show",
    "__version__",
]
