"""mmjax: multimodal (CoCa / CLIP / SigLIP) pretraining in JAX, from one CPU to a pod."""
from setuptools import find_packages, setup

setup(
    name="mmjax",
    version="0.1.0",
    description="Multimodal foundation-model pretraining in JAX/Flax: CoCa, CLIP, SigLIP.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["mmjax", "mmjax.*"]),
    package_data={"mmjax.evals": ["data/*.txt"]},  # class names and prompt templates
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9.8",
        "sentencepiece>=0.2",
        "ftfy",  # data.tokenizer=clip_bpe cleans text as open_clip does (ids differ without it)
        "regex",  # data.tokenizer=clip_bpe: CLIP's \p{L} word pattern
        "safetensors",  # open_clip checkpoints in and out (mmjax.tools.import_openclip / export_openclip), no torch
        "ml-collections>=1.0",
        "chex>=0.1.90",
        "numpy>=1.26",
        "absl-py",
        "Pillow",
        "tensorboardX",
        "matplotlib",
        "sacrebleu",
        "braceexpand",  # wds:/parquet: shard patterns like {00000..00331}
        "pyarrow",  # parquet: sources
        "psutil",  # the input benchmark counts its workers' CPU time
    ],
    extras_require={
        "fast": ["simplejpeg"],  # faster JPEG decoding on the host (Pillow otherwise)
        # nbclient, nbformat, ipykernel: tests/test_colab_notebook.py runs launch/colab.ipynb.
        # torch + open_clip_torch: the peer for the parity tests (tests/test_openclip_interop.py,
        # test_clip_tokenizer.py; they skip without them). torch < 2.14 takes a CPU wheel where one is at hand
        # (torch 2.13.0+cpu on our CI machines); the models never touch torchvision (tests/openclip_reference.py).
        "test": [
            "pytest>=8", "pytest-xdist", "simplejpeg", "nbclient", "nbformat", "ipykernel",
            "torch>=2.4,<2.14", "open_clip_torch",
        ],
        # --workdir=gs://...: etils.epath reaches GCS through gcsfs, tensorboardX through google-cloud-storage
        "gcs": ["gcsfs", "google-cloud-storage"],
        # open_clip itself, beside mmjax (its tokenizer's vocabulary file is read from the installed package)
        "interop": ["open_clip_torch"],
    },
)
