"""MNIST (LeCun et al. 1998) in grey levels, from the four canonical IDX files."""
from ..loaders import idx_files, idx_grey_levels
from ..registry import DatasetSpec, register

# md5 of each .gz as the mirrors serve it (the values torchvision checks).
MNIST = register(DatasetSpec(
    name="mnist", pretty="MNIST", loader=idx_grey_levels,
    files=idx_files(("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                     "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c")),
    sizes={"train": 60_000, "test": 10_000},
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    search_dirs=("mnist", "MNIST/raw", ""),     # "": the shared copy keeps them in root itself
    torchvision="MNIST",
))
