"""Dataset pipelines: the Ray Data decomposition job and the Zarr + Parquet store it writes.

    from nextdetail.pipelines import DecompositionStore, JobConfig, run_job
    report = run_job(JobConfig(src="photos/", out="store/", size=256))
    store = DecompositionStore("store/")     # len(store), store[i].image / .bases / .details

Ray, Zarr and pyarrow are imported only by the functions that need them, so importing this
package stays cheap.
"""
from ..errors import ConfigError, JobError
from ..stores.decomposition import DecompositionStore, StoreItem
from ..stores.decomposition_format import Source, StoreError, StoreParams
from .config import JobConfig
from .job import JobReport, run_job
from .shard_sources import ShardOptions
from .sources import SourceError, SourceListing, list_sources, scan_source

__all__ = ["ConfigError", "DecompositionStore", "JobConfig", "JobError", "JobReport", "Source",
           "ShardOptions", "SourceError", "SourceListing", "StoreError", "StoreItem", "StoreParams", "list_sources",
           "run_job", "scan_source"]
