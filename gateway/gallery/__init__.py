"""The gallery: where a model's files come from, how they are checked, and a models dir it can
only add to.

`gallery/index.yaml` (or `HEARTH_GALLERY`) lists entries, decoded one by one (`index`): an
invalid or unsafe entry is left out with its reason. Installing one (`install`) fetches (`fetch`)
into a private staging folder, checks every sha256, and only then adds the model's own folder,
`<models dir>/<name>/`, with a manifest of what it wrote, and last its YAML, `<name>.yaml`; it
never replaces a file it did not write (`disk`). Removing a model (`remove`) deletes the YAML and
exactly the files the manifest lists. `jobs` runs installs in the background of a gateway.
"""

from gateway.gallery.disk import MANIFEST, Manifest
from gateway.gallery.errors import (
    EntryRejected,
    InstallCancelled,
    InstallError,
    InstallRefused,
    NotInstalledError,
    RemovalRefused,
)
from gateway.gallery.fetch import Progress, ProgressCallback
from gateway.gallery.index import (
    DEFAULT_INDEX,
    GalleryEntry,
    GalleryFile,
    GalleryIndex,
    GalleryPart,
    gallery_path,
    load_gallery,
)
from gateway.gallery.install import (
    check_install,
    entry_footprint,
    find_entry,
    install_entry,
    install_named,
    is_installed,
)
from gateway.gallery.jobs import Installer, InstallJob
from gateway.gallery.remove import Removal, RemovalPlan, plan_removal, remove_model

__all__ = [
    "DEFAULT_INDEX",
    "MANIFEST",
    "EntryRejected",
    "GalleryEntry",
    "GalleryFile",
    "GalleryIndex",
    "GalleryPart",
    "InstallCancelled",
    "InstallError",
    "InstallJob",
    "InstallRefused",
    "Installer",
    "Manifest",
    "NotInstalledError",
    "Progress",
    "ProgressCallback",
    "Removal",
    "RemovalPlan",
    "RemovalRefused",
    "check_install",
    "entry_footprint",
    "find_entry",
    "gallery_path",
    "install_entry",
    "install_named",
    "is_installed",
    "load_gallery",
    "plan_removal",
    "remove_model",
]
