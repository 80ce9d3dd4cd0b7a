"""HIPT-JAX: hierarchical ViTs for gigapixel pathology in JAX/Flax."""
from setuptools import find_packages, setup

# Pins are the versions the package index of our build machines serves; see README.
JAX_VERSION = "0.10.2"  # jax, jaxlib and the accelerator extras below must agree

INSTALL_REQUIRES = [
    f"jax=={JAX_VERSION}",
    f"jaxlib=={JAX_VERSION}",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "array-record==0.8.6",
    "numpy==2.4.6",
    "openslide-python==1.4.7",
    "openslide-bin==4.0.1.2",
    "ml-collections==1.1.0",
    "einops==0.8.2",  # head splitting and patch cutting (hipt_jax/models)
    "scipy==1.17.1",  # rank statistics (evaluation, heatmaps)
    "etils[epath]==1.15.0",  # TFDS builders' paths (data_prep/tfds_builders.py)
    "tifffile==2026.3.3",
    "imagecodecs==2026.3.6",  # not imported: tifffile's JPEG/LZW codecs for slide tiles
    "opencv-python-headless==5.0.0.93",
    "scikit-learn==1.9.1",
    "tensorflow-datasets==4.9.10",
    "pillow>=10",  # region images; exact pin only in the beam extra (Beam caps it)
    "msgpack==1.2.4",  # data_prep record schema (also a flax dependency)
    "h5py==3.16.0",  # TRIDENT/CLAM .h5 bags and coordinate files
    "shapely==2.2.0",  # annotation polygons (hipt-prep --annotations)
    "absl-py",
    "tqdm",
    "tensorboardX",
    "matplotlib",
]

# Apache Beam caps pillow, protobuf and pyarrow; these exact pins exist only for its sake, so
# they travel with Beam and the core package installs beside other scientific packages.
BEAM = ["apache-beam==2.77.0", "pillow==12.3.0", "protobuf==6.33.6", "pyarrow==25.0.1"]

EXTRAS = {
    # torch is only needed to read/write the official .pth files.
    "convert": ["torch==2.13.0"],
    "beam": BEAM,
    "test": ["pytest", "pytest-timeout", "pytest-xdist==3.8.0", "torch==2.13.0", "scikit-survival==0.28.0"]
    + BEAM,
    # Accelerators: jax's own extras pin the plugin built for this jax (jax-cuda12-plugin with
    # the CUDA 12 wheels; libtpu). `make demo` / `make test` stay on the CPU install.
    "cuda12": [f"jax[cuda12]=={JAX_VERSION}"],
    "tpu": [f"jax[tpu]=={JAX_VERSION}"],
}

setup(
    name="hipt-jax",
    version="0.1.0",
    description="HIPT (CVPR 2022) in JAX/Flax: hierarchical ViTs for whole-slide images",
    packages=find_packages(include=["hipt_jax", "hipt_jax.*", "data_prep", "data_prep.*", "configs"]),
    # The embedded demo slide (public domain, 1.9 MB) ships with the package.
    package_data={"data_prep": ["testdata/*"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "hipt-convert=hipt_jax.cli.convert:main",
            "hipt-embed=hipt_jax.cli.embed:main",
            "hipt-extract=hipt_jax.cli.extract:main",
            "hipt-knn=hipt_jax.cli.knn:main",
            "hipt-patch-eval=hipt_jax.cli.patch_eval:main",
            "hipt-finetune=hipt_jax.cli.finetune:main",
            "hipt-predict=hipt_jax.cli.predict:main",
            "hipt-pretrain=hipt_jax.cli.pretrain:main",
            "hipt-heatmap=hipt_jax.cli.heatmap:main",
            "hipt-profile=hipt_jax.cli.profile:main",
            "hipt-prep=hipt_jax.cli.prep:main",
        ]
    },
)
