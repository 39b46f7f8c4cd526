"""Fashion-MNIST (Xiao et al. 2017) in grey levels, as the authors' code used it, from its IDX
files. Never looked for in root itself: its file names are MNIST's."""
from ..loaders import idx_files, idx_grey_levels
from ..registry import DatasetSpec, register

FASHION_MNIST = register(DatasetSpec(
    name="fashion_mnist", pretty="Fashion-MNIST", loader=idx_grey_levels,
    files=idx_files(("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                     "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310")),
    sizes={"train": 60_000, "test": 10_000},
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
             "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
    search_dirs=("fashion_mnist", "FashionMNIST/raw"),
    torchvision="FashionMNIST",
))
