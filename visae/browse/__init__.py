"""Browse named concepts: a static site with top images, written and (optionally) served locally.

    python scripts/browse.py --sae runs/best --shards runs/feats --out runs/site [--concepts runs/concepts] [--serve]

Without ``--concepts`` the naming stage runs first (``visae.naming``, its options from
``--naming_config`` or configs/naming.yaml, with ``--model`` / ``--vocab`` passed through); when
the SAE cannot be named (not trained on a final image embedding, no text tower) the site still
shows every latent's images, unnamed. With ``--concepts DIR`` its ``concepts.json`` is used and its
``top_images.npz`` too when it matches the shard set. With ``--cbm DIR`` (a `visae cbm` output of this
SAE) the site also gets a page per class and concept pages list the classes that use them. ``--serve`` serves the site on
127.0.0.1 only (http.server) and prints the URL. ``visae browse serve SITE [--port N]`` serves a
site already written, without rebuilding anything. Layout: :mod:`visae.browse.site`.
"""

from __future__ import annotations

import errno
import functools
import http.server
import logging
import os
import sys
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Optional

from visae.config import ConfigError, absolute_paths, check_bounds, config_to_dict, parse_config
from visae.errors import VisaeError
from visae.naming import NameConfig
from visae.resources import config_yaml

__all__ = ["BrowseConfig", "BrowseError", "PortInUseError", "build_site", "serve", "main"]


class BrowseError(VisaeError, ValueError):
    """The site cannot be built or served from what was given: an ``--out`` that holds something else, an SAE,
    shard set or names that do not fit together, a port out of range (exit status 2)."""


class PortInUseError(BrowseError):
    """Another process holds the port (exit status 1: the command is right, its surroundings stopped it)."""

    exit_code = 1

log = logging.getLogger(__name__)
HOST = "127.0.0.1"


@dataclass(frozen=True)
class BrowseConfig:
    """Write a static site of an SAE's named concepts with their top images (and serve it on 127.0.0.1).

    Which SAE, which shard set and how its latents are named are the naming settings (the
    nested ``naming``: --sae, --shards, --member, --n_top, --vocab, ...; `visae name --help`
    says what each does); the site's own are below.
    """

    concepts: Optional[str] = field(default=None, metadata={
        "help": "directory with concepts.json from `visae name` (and top_images.npz); null: name them now"})
    out: str = field(default="site", metadata={"help": "output directory of the site"})
    serve: bool = field(default=False, metadata={"help": "serve the site on 127.0.0.1 after writing it (Ctrl-C stops)"})
    port: int = field(default=8000, metadata={"help": "port for --serve (0: any free port)"})
    images_root: Optional[str] = field(default=None, metadata={
        "help": "where the images are now, if moved since extraction; null: the manifest's source.dataset"})
    thumb_size: int = field(default=160, metadata={"help": "thumbnail size in pixels (longest side)"})
    workers: int = field(default=0, metadata={"help": "threads making thumbnails (0: up to 8, one per core)"})
    title: str = field(default="", metadata={"help": "page title; empty: from the SAE and model"})
    cbm: Optional[str] = field(default=None, metadata={
        "help": "a concept bottleneck classifier of this SAE (the --out of `visae cbm`: cbm.json + cbm.safetensors): "
                "adds a page per class with its concepts and accuracy, and lists on each concept page the classes "
                "that use it; null: no class pages"})
    image_score: Literal["max", "mean"] = field(default="max", metadata={
        "help": "patch-token shard sets: an image's activation for a concept, the max or the mean over its patches "
                "(ranks the top images; counts are of images)"})
    naming: NameConfig = field(default_factory=NameConfig, metadata={
        "help": "the SAE, its shard set and the naming of its latents (used to name them when --concepts is not "
                "given; --n_top / --n_random are the images shown per concept)", "fixed": ("out",),
        "required": ("sae",)})

    def __post_init__(self) -> None:
        if self.naming.out != NameConfig().out:
            raise ConfigError("BrowseConfig.naming.out is set by browse (<out>/concepts_data); leave it out")
        # refused here, before naming and thumbnails: a bad --workers / --thumb_size failed inside the thumbnail
        # stage, a bad --port only after the whole site was written (an OverflowError traceback from bind)
        check_bounds(self, {"port": (0, 65535), "thumb_size": (1, None), "workers": (0, None)},
                     {"port": "(0: any free port)", "workers": "(0: up to 8, one per core)"})


def _naming_config(cfg: BrowseConfig, shards: Path, out: Path) -> Any:
    return replace(cfg.naming, shards=str(shards), out=str(out))


def _matching_stats(path: Path, n_examples: int, d_sae: int, cfg: BrowseConfig) -> Any:
    from visae.topimages import TopImages

    if not path.is_file():
        return None
    try:
        st = TopImages.load(path)
    except (OSError, ValueError) as e:
        log.warning("ignoring %s (%s)", path, e)
        return None
    if (st.n_rows != n_examples or st.d_sae != d_sae or st.top_index.shape[1] < cfg.naming.n_top
            or st.rand_index.shape[1] < cfg.naming.n_random or (st.per_image and st.image_score != cfg.image_score)):
        log.info("%s was made for another shard set or fewer images; recomputing", path)
        return None
    return st


def _check_site_out(out: Path) -> None:
    """Refuse an ``--out`` that holds something other than a site: the build replaces the whole directory (built
    beside, swapped in), so ``--out runs/sae`` would have deleted a trained SAE. An absent or empty directory (hidden
    files aside: the lock) or an earlier site (``site.json`` or ``index.html``) passes. Raises BrowseError naming it."""
    if not out.exists():
        return
    if not out.is_dir():
        raise BrowseError(f"--out {out} is a file, not a site directory")
    names = [f.name for f in out.iterdir() if not f.name.startswith(".")]
    if names and not ({"site.json", "index.html"} & set(names)):
        raise BrowseError(f"--out {out} holds other files ({', '.join(sorted(names)[:5])}{', ...' if len(names) > 5 else ''}"
                         "), not a site: the build replaces the whole directory; choose a new or empty --out")


def build_site(cfg: BrowseConfig, *, backbone: Any = None) -> Path:
    """Write the site; returns the path of its index.html (``backbone``: an already loaded text model for naming).

    Holds the lock of the site directory while it writes (:func:`visae.atomic.output_lock`).
    """
    from visae.atomic import output_lock

    _check_site_out(Path(cfg.out))
    if cfg.cbm:  # a bad CBM directory is refused before the site's directory is created or locked
        read_site_cbm(cfg.cbm, None, cfg.naming.member, cfg.naming.sae)
    if cfg.concepts:  # so are names made for another SAE (they would label this SAE's latents)
        from visae.naming import check_concepts_sae, read_concepts

        check_concepts_sae(read_concepts(cfg.concepts), cfg.naming.sae or None, cfg.naming.member,
                           f"--concepts {cfg.concepts}")
    with output_lock(cfg.out, "visae browse"):  # (creates cfg.out, holds .visae.lock, carried into the new site)
        return _build_site(cfg, backbone=backbone)


def _build_site(cfg: BrowseConfig, *, backbone: Any = None) -> Path:
    from visae.atomic import staged_dir
    from visae.naming import _shards_path
    from visae.sae import load_sae
    from visae.shards import ShardSet

    if not cfg.naming.sae:
        raise BrowseError("--sae is required: an SAE directory (cfg.json + weights.safetensors)")
    sae = load_sae(cfg.naming.sae, device=cfg.naming.device)
    if not 0 <= cfg.naming.member < sae.n_models:
        raise BrowseError(f"SAE {cfg.naming.sae}: member {cfg.naming.member} out of range (stack of {sae.n_models})")
    single = sae.member(cfg.naming.member) if sae.n_models > 1 else sae
    shards = Path(cfg.naming.shards) if cfg.naming.shards else _shards_path(NameConfig(member=cfg.naming.member), sae)
    if shards is None:
        raise BrowseError(f"SAE {cfg.naming.sae}: pass --shards (its cfg.json records no shard set that still exists)")
    ss = ShardSet(shards)
    from visae.zeroshot import sae_shards_mismatch

    diffs = sae_shards_mismatch(sae, ss)
    if diffs:  # same width, other activations: the top images would be another layer's
        raise BrowseError(f"--shards {shards}: not the activations SAE {cfg.naming.sae} was trained on ({'; '.join(diffs)})")
    cbm = read_site_cbm(cfg.cbm, sae.d_sae, cfg.naming.member, cfg.naming.sae) if cfg.cbm else None
    site = Path(cfg.out)
    # Built beside, swapped in when complete (visae.atomic.staged_dir): a build that fails or is
    # killed leaves the previous site as it was. Existing thumbnails are carried (hard links) and reused.
    with staged_dir(site, carry=["thumbs"]) as stage:
        _build_into(cfg, stage, site, sae, single, shards, ss, backbone, cbm)
    return site / "index.html"


def read_site_cbm(path: str | Path, d_sae: int | None, member: int, sae_path: str | Path) -> dict[str, Any]:
    """A CBM directory (:func:`visae.cbm.load_cbm`) checked against the browsed SAE: its cbm.json plus ``latents``
    (the SAE latent ids of its concepts, from cbm.safetensors) and ``cbm_dir``.

    Raises ValueError (:class:`visae.cbm.CBMError`) naming the file and field when it is not a CBM directory, its
    ``member`` is another member of a stacked SAE, its classes do not list their concepts, or (``d_sae`` given) a
    latent id is not below the SAE's ``d_sae``, or it records the weights digest of another SAE
    (``sae_weights_sha256``; a copy of the same SAE passes). A CBM without that record (written before 2026-12-01)
    that names another SAE directory is used with a warning (the SAE may have been copied).
    """
    from visae.cbm import CBMError, load_cbm

    model, doc = load_cbm(path)
    j, w = Path(path) / "cbm.json", Path(path) / "cbm.safetensors"
    if int(doc.get("member") or 0) != int(member):
        raise CBMError(f"{j}: field 'member' is {doc.get('member')}, but the site shows member {member} of the SAE")
    classes = doc.get("classes")
    if not isinstance(classes, list) or not all(
            isinstance(c, dict) and {"class", "name", "concepts"} <= set(c) and isinstance(c["concepts"], list)
            and all(isinstance(x, dict) and isinstance(x.get("latent"), int) and isinstance(x.get("weight"), (int, float))
                    for x in c["concepts"]) for c in classes):
        raise CBMError(f"{j}: field 'classes' must be a list of {{class, name, concepts: [{{latent, name, weight}}], "
                       "...}} (as visae cbm writes it)")
    lat = [int(x) for x in model.latents.tolist()]
    used = [int(x["latent"]) for c in classes for x in c["concepts"]]
    if d_sae is not None and any(not 0 <= x < d_sae for x in lat + used):
        raise CBMError(f"{w}: latent ids from {min(lat + used)} to {max(lat + used)}, but the SAE has d_sae={d_sae}: "
                       "a CBM of another SAE")
    from visae.naming import recorded_sae_mismatch

    other = recorded_sae_mismatch(doc, sae_path, str(j), warn=d_sae is not None)  # warned once, at the second call
    if other:
        raise CBMError(f"{j}: a CBM {other}: its class pages would list this SAE's latents under its concepts")
    return {**doc, "latents": lat, "cbm_dir": str(path)}


def _build_into(cfg: BrowseConfig, stage: Path, site: Path, sae: Any, single: Any, shards: Path, ss: Any,
                backbone: Any, cbm: dict[str, Any] | None = None) -> Path:
    """Write the site into ``stage`` (the staging directory of ``site``, its final path)."""
    from visae.browse.images import ImageResolver, make_thumbnails
    from visae.browse.site import write_site
    from visae.naming import NamingError, name_concepts, read_concepts
    from visae.topimages import compute_top_images

    stats = None
    if cfg.concepts:
        doc = read_concepts(cfg.concepts)
        stats = _matching_stats(Path(cfg.concepts) / "top_images.npz", len(ss), sae.d_sae, cfg)
    else:
        ncfg = _naming_config(cfg, shards, stage / "concepts_data")
        try:
            name_concepts(ncfg, sae=sae, backbone=backbone)
            doc = read_concepts(stage / "concepts_data")
            stats = _matching_stats(stage / "concepts_data" / "top_images.npz", len(ss), sae.d_sae, cfg)
        except NamingError as e:
            log.warning("concepts cannot be named (%s); the site shows them unnamed", e)
            doc = {"concepts": [{"latent": j, "name": None, "alternatives": [], "unnamed_reason": "not nameable"}
                                for j in range(sae.d_sae)], "model": {}, "vocabulary": {}}
    if stats is not None and not stats.per_image and len(ss) and "#p" in str(ss.shard_meta(0)["id"][0]):
        log.info("the saved statistics count patch rows; recomputing them per image")
        stats = None  # made before images were counted per image: one row per patch, photos repeated
    if stats is None:
        stats = compute_top_images(single, ss, n_top=cfg.naming.n_top, n_random=cfg.naming.n_random, batch_size=cfg.naming.batch_size,
                                   seed=cfg.naming.seed, device=cfg.naming.device, image_score=cfg.image_score,
                                   progress=cfg.naming.progress)  # --no_progress: no bar (it drew one)
    concepts = doc["concepts"]
    if len(concepts) != sae.d_sae:
        raise BrowseError(f"{cfg.concepts}: concepts.json has {len(concepts)} concepts but the SAE has d_sae={sae.d_sae}")
    for c in concepts:  # statistics of this shard set
        j = c["latent"]
        c["frequency"] = float(stats.frequency[j])
        c["mean_activation"] = float(stats.mean_activation[j])

    meta = ss.metadata()
    ids = meta["id"]
    need = set(stats.top_index[:, : cfg.naming.n_top].ravel().tolist()) | set(stats.rand_index[:, : cfg.naming.n_random].ravel().tolist())
    need.discard(-1)
    resolver = ImageResolver(ss.source, cfg.images_root)
    thumbs = make_thumbnails(resolver, [str(ids[i]) for i in sorted(need)], stage / "thumbs", size=cfg.thumb_size,
                             workers=cfg.workers, progress=cfg.naming.progress)  # one switch for the run's bars
    n_thumbs = sum(v is not None for v in thumbs.values())
    if need and n_thumbs == 0:
        log.warning("no image could be found for the shard ids (source.dataset=%r); pages show ids. Pass --images_root "
                    "if the images moved", ss.source.get("dataset"))
    label_names = ss.label_names.get("label")
    model = doc.get("model") or {}
    title = cfg.title or f"Concepts of {Path(cfg.naming.sae).name}"
    n_named = sum(1 for c in concepts if c.get("name"))
    counted = (f"{stats.n_examples:,} images ({stats.n_rows:,} patch tokens; an image's activation is the "
               f"{stats.image_score} over its patches)" if stats.per_image else f"{len(ss):,} images")
    subtitle = (f"{sae.d_sae} latents, {n_named} named; model {model.get('name') or ss.source.get('model', '?')}; "
                f"{counted} from {ss.source.get('dataset', shards)}")
    # file and directory arguments recorded absolute: as typed (relative) they did not say which from elsewhere
    rec = absolute_paths(config_to_dict(cfg), ("concepts", "out", "images_root", "cbm", "naming.sae", "naming.vocab",
                                               "naming.shards", "naming.text_cache"), if_file=("naming.pretrained",))
    info = {"config": rec, "sae": rec["naming"]["sae"], "shards": os.path.abspath(shards), "n_examples": len(ss),
            "concepts_from": rec["concepts"] or os.path.abspath(site / "concepts_data"), "thumbnails": n_thumbs,
            "images_needed": len(need), "model": model, "vocabulary": doc.get("vocabulary"),
            "unit": stats.unit, "n_images" if stats.per_image else "n_units": stats.n_examples,
            "image_score": stats.image_score or None,
            "cbm": None if cbm is None else {"dir": rec["cbm"], "num_classes": len(cbm["classes"]),
                                             "top1": cbm.get("top1"), "concepts_per_class": cbm.get("concepts_per_class")}}
    stats_top = stats
    if stats.top_index.shape[1] > cfg.naming.n_top or stats.rand_index.shape[1] > cfg.naming.n_random:
        stats_top = replace(stats, top_index=stats.top_index[:, : cfg.naming.n_top], top_value=stats.top_value[:, : cfg.naming.n_top],
                            rand_index=stats.rand_index[:, : cfg.naming.n_random], rand_value=stats.rand_value[:, : cfg.naming.n_random])
        if stats.per_image:
            stats_top = replace(stats_top, top_heat=stats.top_heat[:, : cfg.naming.n_top],
                                rand_heat=stats.rand_heat[:, : cfg.naming.n_random])
    random_init = random_weights_recorded(ss.source, sae.extra, model)
    info["backbone_random_init"] = random_init
    warning = RANDOM_WEIGHTS_SITE_NOTE if random_init else None
    if random_init:
        log.warning("%s", RANDOM_WEIGHTS_SITE_NOTE)
    return write_site(stage, concepts, stats_top, ids, meta.get("label"), label_names, thumbs, title=title,
                      subtitle=subtitle, info=info, warning=warning, cbm=cbm)


RANDOM_WEIGHTS_SITE_NOTE = ("these activations come from a backbone with RANDOM weights (recorded in the shard set's or "
                            "the SAE's provenance): the latents and their names are not concepts of a trained model")


def random_weights_recorded(source: dict[str, Any] | None, sae_extra: dict[str, Any] | None,
                            model: dict[str, Any] | None) -> bool:
    """Whether any recorded provenance says the backbone had random weights: the browsed shard set's
    ``source.random_init``, the SAE's training record (``extra.backbone_random_init`` or
    ``extra.shards.source.random_init``), or the naming record (``model.random_init``)."""
    extra = sae_extra or {}
    return bool((source or {}).get("random_init") or extra.get("backbone_random_init")
                or ((extra.get("shards") or {}).get("source") or {}).get("random_init")
                or (model or {}).get("random_init"))


class _SiteHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the regular files under the site root and nothing else.

    Every request gets an answer: a path that resolves (symlinks followed) outside the root, a
    directory without ``index.html``, or anything that is not a regular file is 404; a path the
    file system cannot represent (a NUL byte, an undecodable escape) is 400. No directory listings.
    """

    root: str = ""  # realpath of the site, set by serve()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        log.debug("%s - %s", self.address_string(), format % args)

    def _resolve(self) -> str | None:
        path = self.translate_path(self.path)
        if "\x00" in path:
            raise ValueError("NUL byte in the path")
        real = os.path.realpath(path)
        if os.path.isdir(real):
            real = os.path.realpath(os.path.join(real, "index.html"))
        inside = real == self.root or real.startswith(self.root + os.sep)
        return real if inside and os.path.isfile(real) else None

    def send_head(self):  # type: ignore[override] - same contract as the base class
        try:
            real = self._resolve()
        except ValueError:
            self.send_error(400, "bad request path")
            return None
        if real is None:
            self.send_error(404, "not found")
            return None
        return super().send_head()


class _SiteServer(http.server.ThreadingHTTPServer):
    # The listen backlog: socketserver's default of 5 drops connections when a browser (or a script)
    # opens many at once; the kernel caps this at net.core.somaxconn.
    request_queue_size = 1024
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away mid-reply (closed tab, reload) is routine: logged at debug, no traceback."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            log.debug("client %s went away", client_address)
            return
        super().handle_error(request, client_address)


def serve(site: str | Path, port: int = 8000, *, block: bool = True) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve ``site`` on 127.0.0.1:``port`` (0 = any free port); returns (server, index URL).

    Only regular files under ``site`` are served (resolved paths: a symlink out of the site is 404);
    every request is answered (400 for paths with a NUL byte, 404 otherwise). ``block=False`` runs it
    in a daemon thread (call ``server.shutdown()`` then ``server.server_close()`` to stop).

    Raises:
        BrowseError: the port is out of range, in use or cannot be bound (the message says which and what to do).
    """
    if not 0 <= port <= 65535:  # bind() raised OverflowError for these (a traceback, not a message)
        raise BrowseError(f"port {port}: expected 0..65535 (0: any free port)")
    root = os.path.realpath(site)
    handler = functools.partial(type("_Handler", (_SiteHandler,), {"root": root}), directory=root)
    try:
        httpd = _SiteServer((HOST, port), handler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise PortInUseError(f"port {port} on {HOST} is in use; pass --port 0 (any free port) or another port") from e
        raise BrowseError(f"cannot serve on {HOST}:{port}: {e.strerror or e}") from e
    url = f"http://{HOST}:{httpd.server_address[1]}/index.html"
    if not block:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        return httpd, url
    print(f"serving {site} at {url} (Ctrl-C stops)", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return httpd, url


def serve_main(argv: list[str]) -> int:
    """``visae browse serve SITE [--port N]``: serve a site that is already written; builds and writes nothing."""
    import argparse

    ap = argparse.ArgumentParser(prog="visae browse serve", description="Serve an existing site (the directory "
                                 "holding index.html, written by `visae browse`) on 127.0.0.1; nothing is rebuilt.")
    ap.add_argument("site", help="the site directory (the --out of `visae browse`)")
    ap.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    args = ap.parse_args(argv)
    if not (Path(args.site) / "index.html").is_file():
        what = "does not exist" if not Path(args.site).exists() else "holds no index.html (not a site written by `visae browse`)"
        print(f"visae browse serve: error: {args.site} {what}; build one with `visae browse --sae DIR --out SITE`",
              file=sys.stderr)
        return 2
    return _serve_cli(args.site, args.port, "visae browse serve")


def _serve_cli(site: str | Path, port: int, prog: str) -> int:
    """``serve`` for a command line: a bad port is one line on stderr and exit status 2, a port in use 1."""
    from visae.errors import report

    try:
        serve(site, port)
    except BrowseError as e:  # a port out of range or in use
        return report(prog, e)
    return 0


def main(argv: list[str] | None = None) -> int:
    from visae.devices import resolve_device
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "serve":  # an existing site: served as it is, never rebuilt
        return serve_main(argv[1:])
    from visae.errors import VisaeError, report

    try:
        cfg = parse_config(BrowseConfig, argv, default_yaml=config_yaml("browse.yaml"), prog="visae browse")
        cfg = replace(cfg, naming=replace(cfg.naming, device=str(resolve_device(cfg.naming.device))))  # 'auto' resolved
        index = build_site(cfg)
    except VisaeError as e:  # a bad flag, SAE, shard set, names, CBM or --out (exit 2; visae.errors)
        return report("visae browse", e)
    print(f"site written: {index}")
    return _serve_cli(index.parent, cfg.port, "visae browse") if cfg.serve else 0


if __name__ == "__main__":
    from visae.cli import run_main

    sys.exit(run_main("python -m visae.browse", main))
