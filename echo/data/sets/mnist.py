"""MNIST (LeCun et al. 1998) in grey levels, from the four canonical IDX files."""
from ..loaders import idx_files, idx_grey_levels
from ..registry import DatasetSpec, register

# md5 of each .gz as the mirrors serve it (the values torchvision checks).
MNIST = register(DatasetSpec(
    name="mnist", pretty="MNIST", loader=idx_grey_levels,
    files=idx_files(("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                     "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c")),
    # sha256 of each file's decompressed content (the canonical IDX bytes; the same for every
    # mirror and for re-compressed copies such as the shared one), checked on download.
    sha256={
        "train-images-idx3-ubyte.gz":
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte.gz":
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte.gz":
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte.gz":
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    sizes={"train": 60_000, "test": 10_000},
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    search_dirs=("mnist", "MNIST/raw", ""),     # "": the shared copy keeps them in root itself
    torchvision="MNIST",
))
