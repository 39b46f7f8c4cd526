"""One module per data set, each registering its `DatasetSpec` when imported; this package
imports every module in it, so a new file here is a new data set (docs/data.md)."""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
