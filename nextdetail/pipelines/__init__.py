"""Dataset pipelines: the Ray Data decomposition job and the Zarr + Parquet store it writes.

    from nextdetail.pipelines import DecomposeDatasetConfig, DecompositionStore, run_job
    report = run_job(DecomposeDatasetConfig(src="photos/", out="store/", size=256))
    store = DecompositionStore("store/")     # len(store), store[i].image / .bases / .details

Ray, Zarr and pyarrow are imported only by the functions that need them, so importing this
package stays cheap.
"""
from ..errors import ConfigError, JobError
from ..stores.decomposition import DecompositionStore, StoreItem
from ..stores.decomposition_format import Source, StoreError, StoreParams
from .config import DecomposeDatasetConfig
from .decompose_job import DecomposeDatasetReport, run_job
from .source_files import SourceFileOptions
from .sources import SourceError, SourceListing, list_sources, scan_source

__all__ = ["ConfigError", "DecomposeDatasetConfig", "DecomposeDatasetReport", "DecompositionStore", "JobError",
           "Source", "SourceError", "SourceFileOptions", "SourceListing", "StoreError", "StoreItem", "StoreParams",
           "list_sources", "run_job", "scan_source"]
