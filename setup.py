"""megaprolong: continue Llama-3 pre-training to 512K context with the ProLong recipe on megatron-core."""

from setuptools import find_packages, setup

# The oldest releases the suite runs (tests/test_oldest_stack.py): the GPU test machine's torch and transformers.
TORCH_FLOOR = "2.11"
TRANSFORMERS_FLOOR = "5.17"
TRANSFORMERS = f"transformers>={TRANSFORMERS_FLOOR}"

setup(
    name="megaprolong",
    version="0.1.0",
    description="ProLong long-context continued pre-training on megatron-core",
    python_requires=">=3.12",
    packages=find_packages(include=["megaprolong", "megaprolong.*"]),  # tools/ holds scripts, not a package
    install_requires=[
        # NVIDIA's containers bring their own torch, versioned as a pre-release of the release it precedes
        # (2.11.0a0+<commit>.nv26.xx): the floor admits those, so that pip keeps it. A range, never a pin
        # (constraints.txt pins for CI).
        f"torch>={TORCH_FLOOR}.0a0",
        "megatron-core>=0.19,<0.20",
        "numpy",
        "pyyaml",
        "psutil",  # megatron-core's checkpoint writer needs it but does not declare it
        "packaging",
        "tokenizers",
        "tqdm",
        "zstandard",  # .jsonl.zst inputs
        "xxhash",  # full-content checkpoint digests (xxh3-64)
        "pyarrow",  # parquet inputs
        "gigatoken",  # fast exact BPE tokenization (checked against tokenizers at start-up)
        "safetensors",  # HF checkpoints (conversion)
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
        "mpi": ["mpi4py"],
        "hf": [TRANSFORMERS, "safetensors"],
        # The HF stages: SFT (TRL on transformers, FSDP2 via accelerate) and evaluation (plots).
        "sft": [TRANSFORMERS, "trl>=1.16", "accelerate", "datasets", "safetensors"],
        "eval": [TRANSFORMERS, "matplotlib"],
        # the short-context suite (megaprolong-eval short): EleutherAI's lm-evaluation-harness and its hf model
        "lmeval": ["lm-eval>=0.4.13,<0.5", "accelerate"],
        # monitoring: TensorBoard event files and W&B runs (logging.tensorboard_dir, logging.wandb_project)
        "monitor": ["tensorboard", "wandb"],
        "dev": ["pytest", "pytest-timeout", TRANSFORMERS, "safetensors", "trl>=1.16", "accelerate", "datasets",
                "matplotlib", "tensorboard", "wandb", "lm-eval>=0.4.13,<0.5"],
    },
    entry_points={
        "console_scripts": [
            "megaprolong-train=megaprolong.train:main",
            "megaprolong-preprocess=megaprolong.cli.preprocess:main",
            "megaprolong-convert=megaprolong.cli.convert:main",
            "megaprolong-sft=megaprolong.sft.cli:main",
            "megaprolong-eval=megaprolong.eval.cli:main",
            "megaprolong-plan=megaprolong.cli.plan:main",
            "megaprolong-pipeline=megaprolong.pipeline.cli:main",
        ]
    },
)
