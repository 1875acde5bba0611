"""Image datasets for pretraining and evaluation, and the robust decode they all share.

``data.path`` picks the source (see :func:`open_source`): ``digits`` (built in), a folder of images, parquet/arrow
files in the Hugging Face layout, or a Hub dataset id. Every source holds *undecoded* records and decodes them
here, so a corrupt file becomes a counted :class:`Skipped` item in the batch instead of a crashed run.

The package, by responsibility:

- ``locate.py``: what ``data.path`` names (the plan, splits, globs) and the openers :func:`open_source`,
  :func:`open_stream`, :func:`count_samples`;
- ``sources.py``: the map-style sources (digits, image folder, table rows) and their labels;
- ``folders.py``: the image-folder scan (class folders, symlinks followed once);
- ``decode.py``: any image to RGB, :class:`BadSample` and :class:`Skipped`;
- ``loader.py``: augmented views (:class:`TransformedImages`, :class:`StreamingImages`), the skipping collate and
  the DataLoader;
- ``seeding.py``: :func:`seeded_rng`, the per-sample RNG that makes augmentations independent of workers and resume.
"""

from sslvit.data.decode import BadSample, Skipped, decode, to_rgb
from sslvit.data.folders import IMAGE_EXTENSIONS
from sslvit.data.loader import StreamingImages, TransformedImages, collate_skipping, make_loader, resolve_num_workers
from sslvit.data.locate import SPLIT_FOLDER_NAMES, TABLE_KINDS, count_samples, open_source, open_stream
from sslvit.data.seeding import seeded_rng
from sslvit.data.sources import DIGITS_SPLITS, DigitsSource, FolderSource, ImageSource, TableSource

__all__ = [
    "DIGITS_SPLITS",
    "IMAGE_EXTENSIONS",
    "SPLIT_FOLDER_NAMES",
    "TABLE_KINDS",
    "BadSample",
    "DigitsSource",
    "FolderSource",
    "ImageSource",
    "Skipped",
    "StreamingImages",
    "TableSource",
    "TransformedImages",
    "collate_skipping",
    "count_samples",
    "decode",
    "make_loader",
    "open_source",
    "open_stream",
    "resolve_num_workers",
    "seeded_rng",
    "to_rgb",
]
