"""`capfilt bootstrap`: BLIP's whole learning framework (paper, Fig. 3), each step a normal capfilt command.

1. pretrain on the noisy web corpus (+ the clean annotated set, as the paper's baseline includes COCO);
2. fine-tune a captioner (LM) and a filter (ITC + ITM) from it on the clean set;
3. `capfilt run` over the web corpus with that captioner and filter;
4. pretrain a new model from the same start on the bootstrapped corpus (kept web texts + kept synthetic captions +
   clean set), for as many optimizer steps as step 1 took (`equal_steps`);
5. evaluate every pretrained model as the paper's Table 1 does (Retrieval-FT, Caption-FT): a retrieval model and a
   captioner fine-tuned from it on the clean set (the filter's and the captioner's recipes; the noisy arm's are the
   loop's own filter and captioner), scored on a held-out clean test set: R@K with ITM re-rank, BLEU-4, CIDEr,
   attribute accuracy against the synthetic world's ground truth; and the filter itself: precision/recall of
   dropping the injected noisy web texts, ROC-AUC per noise kind, the share of synthetic captions kept, and how right
   the texts each corpus trains on are (attribute accuracy of web and synthetic texts, before and after the filter).

Every step writes into `workdir/<step>` and a marker `workdir/_done/<step>.json` when it finished (paths in it
relative to the workdir, so a moved or copied workdir reruns on its own files); a rerun skips finished steps. The
table (the paper's Table 1 rows: no bootstrap, C+F, and with `filter_only` also F) goes to
`workdir/bootstrap_report.json`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from pipelines.settings import Settings, resolve_path, resolve_paths


@dataclass
class BootstrapSettings(Settings):
    workdir: str = "runs/bootstrap_demo"
    seed: int = 0
    # the synthetic world (used when `web` is not given)
    image_size: int = 64
    web_samples: int = 2000
    noise: float = 0.5
    clean_samples: int = 400
    test_samples: int = 200
    samples_per_shard: int = 250
    # bring your own data instead: tar folders/globs (the test set needs ground-truth captions in its .txt)
    web: str | None = None
    clean: str | None = None
    test: str | None = None
    # the tokenizer of a from-scratch run: "small" = just the synthetic world's words (~500 tokens: the 30k-entry LM head
    # would dominate a tiny model's step time), "bert" = the 30522-line bert-base-uncased layout
    vocab: str = "small"
    # a pretrained start for both pretraining arms (e.g. the official BLIP checkpoint; its own tokenizer is used);
    # None: from scratch with the synthetic world's tokenizer
    init: str | None = None
    # the C+F pretraining takes as many optimizer steps as the noisy one: filtering drops images (no text kept), so
    # equal epochs would give the C+F arm less training (the paper's two corpora hold about the same 14M images)
    equal_steps: bool = True
    # also the paper's Table 1 "F" row: pretrain on the filtered web texts alone (no synthetic captions), which tells
    # what the filter buys from what the captioner adds; one more capfilt run (ITM only), pretraining and evaluation
    filter_only: bool = False
    # how each pretrained model's retrieval is measured: "finetuned" = the paper's Table 1 (Retrieval-FT: a retrieval
    # model fine-tuned from it on the clean set by the filter's recipe, one more fine-tuning per arm), "zero_shot" = the
    # pretrained model itself (its ITC + ITM; cheaper)
    retrieval_eval: str = "finetuned"
    # the synthetic world's stand-in for the ImageNet ViT BLIP starts from (pipelines/train/warmup.py): a supervised ViT
    # warm-up on a split no other step sees, the ViT start of every pretraining arm; only from scratch on the
    # synthetic world (with `init`, `web`, or `pretrain: {init_vision: ...}` the start is yours)
    warmup_vision: bool = True
    warmup_config: str = "warmup_vision_tiny.yaml"
    warmup: dict[str, Any] = field(default_factory=dict)
    # run settings: a preset YAML per step + overrides
    pretrain_config: str = "pretrain_tiny.yaml"
    pretrain: dict[str, Any] = field(default_factory=dict)
    caption_config: str = "finetune_caption_tiny.yaml"
    finetune_caption: dict[str, Any] = field(default_factory=dict)
    retrieval_config: str = "finetune_retrieval_tiny.yaml"
    finetune_retrieval: dict[str, Any] = field(default_factory=dict)
    capfilt_config: str = "capfilt_tiny.yaml"
    capfilt: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.vocab not in ("small", "bert"):
            raise ValueError(f"vocab must be 'small' or 'bert', got {self.vocab!r}")
        if self.retrieval_eval not in ("finetuned", "zero_shot"):
            raise ValueError(f"retrieval_eval must be 'finetuned' or 'zero_shot', got {self.retrieval_eval!r}")

    def resolve_paths(self) -> None:
        """Relative paths (relative to the working directory, as on the command line) -> absolute, before any step
        hands them to Ray workers; the per-step override dicts are resolved by the settings loader of each step."""
        self.workdir = resolve_path(self.workdir) or self.workdir
        self.init = resolve_path(self.init, hub=True)
        for name in ("web", "clean", "test"):
            setattr(self, name, resolve_paths(getattr(self, name)))
        for name in ("pretrain_config", "caption_config", "retrieval_config", "capfilt_config", "warmup_config"):
            setattr(self, name, _preset(getattr(self, name)))


def _preset(name: str) -> str:
    """A preset: a YAML file (relative to the working directory) made absolute, else a name in configs/."""
    from pipelines.settings import resolve_preset

    return resolve_preset(name)


class Bootstrap:
    def __init__(self, cfg: BootstrapSettings, echo: Callable[[str], None] = print):
        self.cfg = cfg
        self.dir = Path(cfg.workdir)
        self.echo = echo
        (self.dir / "_done").mkdir(parents=True, exist_ok=True)
        self.seconds: dict[str, float] = {}  # each step's wall time; a skipped step's from the run that did it

    # -- step bookkeeping: a finished step leaves a marker with its result; reruns skip it
    def step(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        marker = self.dir / "_done" / f"{name}.json"
        # paths inside the workdir are stored relative to it, so a moved or copied workdir reruns on its own files
        here = json.dumps(str(self.dir) + "/")[1:-1]
        if marker.is_file():
            self.echo(f"== {name}: done before, skipped")
            result = json.loads(marker.read_text().replace('"{workdir}/', f'"{here}'))
            self.seconds[name] = result.get("seconds", 0.0)
            return result
        self.echo(f"== {name}")
        t0 = time.time()
        result = fn()
        result["seconds"] = round(time.time() - t0, 1)
        marker.write_text(json.dumps(result, indent=2, default=str).replace(f'"{here}', '"{workdir}/'))
        self.seconds[name] = result["seconds"]
        self.echo(f"== {name}: {result['seconds']:.0f} s")
        return result

    def path(self, *parts: str) -> str:
        return str(self.dir.joinpath(*parts))

    # -- steps
    def data(self) -> dict[str, Any]:
        from blip.tokenizer import write_vocab
        from capfilt.synth import VOCAB_WORDS, write_corpus

        c = self.cfg
        small = c.vocab == "small"
        out: dict[str, Any] = {
            "tokenizer": str(write_vocab(self.path("tokenizer"), VOCAB_WORDS, pad_to_bert=not small))
        }
        sets = {"web": (c.web_samples, c.noise, c.seed), "clean": (c.clean_samples, 0.0, c.seed + 1)}
        sets["test"] = (c.test_samples, 0.0, c.seed + 2)
        for name, (n, noise, seed) in sets.items():
            given = getattr(c, name)
            if given:
                out[name] = given
                continue
            write_corpus(
                self.path("data", name), n, noise=noise, seed=seed, image_size=c.image_size,
                samples_per_shard=c.samples_per_shard,
            )  # fmt: skip
            out[name] = self.path("data", name)
        return out

    def train(
        self, task: str, preset: str, overrides: dict[str, Any], steps: int | None = None, **kw: Any
    ) -> dict[str, Any]:
        """One training step of the loop; `steps`: exactly that many optimizer steps, the epochs following from the
        data's size (the schedule still decays per epoch, as configured)."""
        from pipelines.train.data import count_tar_samples, list_tars
        from pipelines.train.job import train
        from pipelines.train.settings import TrainSettings

        # the loop's seed seeds every training step too (init, data order, augmentations), unless a step sets its own
        s = TrainSettings.load(_preset(preset), **{"seed": self.cfg.seed, **overrides, **kw, "task": task})
        if steps:
            per_epoch = max(1, count_tar_samples(list_tars(s.data)) // s.global_batch)
            s.epochs, s.max_steps = -(-steps // per_epoch), steps
        summary = train(s)
        last = summary.get("last") or {}
        return {
            "output": s.output,
            "steps": summary.get("final_step"),
            "epochs": s.epochs,
            "samples": summary.get("samples_in_tars"),
            **{k: v for k, v in last.items() if "loss" in k},
        }

    def run_capfilt(
        self, data: dict[str, Any], captioner: str, filt: str, output: str = "capfilt", **kw: Any
    ) -> dict[str, Any]:
        from pipelines.run.config import RunSettings
        from pipelines.run.job import run_capfilt

        rc = RunSettings.load(
            _preset(self.cfg.capfilt_config),
            **{"seed": self.cfg.seed, **self.cfg.capfilt, **kw, "input": data["web"], "output": self.path(output),
               "captioner": captioner, "filter": filt},
        )  # fmt: skip
        summary = run_capfilt(rc)
        if summary.get("failed_shards"):
            raise RuntimeError(f"capfilt run failed on shards {summary['failed_shards']}")
        shards = {k: summary[k] for k in ("shards", "shards_done", "shards_skipped")}
        return {"output": rc.output, "threshold": rc.threshold, "samples": summary["counts"], "shards": shards}

    def evaluate(self, retrieval: str, captioner: str, test: str, name: str) -> dict[str, Any]:
        from pipelines.train.evaluate import evaluate

        e = self.cfg.eval
        ret = evaluate("retrieval", retrieval, test, self.path("eval", name), k_test=e.get("k_test", 16),
                       batch_size=e.get("batch_size", 32))  # fmt: skip
        # `ground_truth`: the standard caption protocol on real test sets (e.g. coco_karpathy_test_gt.json with
        # `test` = the ingested coco_karpathy_test.json); without it, each test sample's own texts are the references
        given = {k: e[k] for k in ("num_beams", "max_length", "min_length", "scorers") if k in e}  # else evaluate's
        cap = evaluate("caption", captioner, test, self.path("eval", name), batch_size=e.get("batch_size", 32),
                       ground_truth=e.get("ground_truth"), **given)  # fmt: skip
        return {"retrieval": ret["metrics"], "caption": cap["metrics"]}

    def filter_quality(self, data: dict[str, Any]) -> dict[str, Any]:
        """What the filter kept, read from the run's parquet; with the synthetic world's ground truth (your own web
        shards have none) also how well it separated the injected noise and how right the kept texts are."""
        import numpy as np
        import pandas as pd

        from capfilt.synth import NOISE_KINDS, caption_accuracy, read_truth

        threshold = json.loads((self.dir / "_done" / "capfilt.json").read_text())["threshold"]
        df = pd.read_parquet(self.path("capfilt", "parquet"))
        ok = df[df["status"] == "ok"]
        web_kept = ok["web_itm"].fillna(-1.0) >= threshold
        n_syn = int(ok["synthetic_itm"].map(len).sum())
        n_syn_kept = int(ok["synthetic_itm"].map(lambda x: sum(v >= threshold for v in x)).sum())
        out: dict[str, Any] = {
            "web_texts": int(len(ok)),
            "web_kept": float(web_kept.mean()) if len(ok) else 0.0,
            "synthetic_kept": n_syn_kept / max(1, n_syn),
            "samples_kept": float(ok["kept"].mean()) if len(ok) else 0.0,
        }
        try:
            truth = read_truth(data["web"])
        except (OSError, ValueError, KeyError):
            truth = {}
        if not len(ok) or not set(ok["key"]) <= set(truth):
            return {**out, "ground_truth": False}

        kind = ok["key"].map(lambda k: truth[k]["noise_kind"])
        noisy = kind != "none"
        dropped = ~web_kept
        tp = int((dropped & noisy).sum())
        score = ok["web_itm"].fillna(-1.0).to_numpy()
        clean = (~noisy).to_numpy()
        auc = {"all": roc_auc(score[clean], score[~clean])}
        for k in NOISE_KINDS:  # how well ITM tells clean web texts from each kind of noise
            auc[k] = roc_auc(score[clean], score[(kind == k).to_numpy()])
        # how right the texts each corpus trains on are: attribute accuracy against the scene (1.0 = every object,
        # colour, shape, size and position right), mean and share exactly right, before and after the filter
        web_acc = [caption_accuracy(t, truth[k]["objects"]) for k, t in zip(ok["key"], ok["caption"])]
        syn = [(caption_accuracy(c, truth[k]["objects"]), v >= threshold)
               for k, caps, itm in zip(ok["key"], ok["synthetic_captions"], ok["synthetic_itm"])
               for c, v in zip(caps, itm)]  # fmt: skip

        def acc(values: list[float]) -> dict[str, Any]:
            return {"n": len(values), "accuracy": 100 * float(np.mean(values)) if values else None,
                    "exact": 100 * float(np.mean([v == 1.0 for v in values])) if values else None}  # fmt: skip

        return {
            **out,
            "ground_truth": True,
            "noisy_web_texts": int(noisy.sum()),
            "drop_precision": tp / max(1, int(dropped.sum())),
            "drop_recall": tp / max(1, int(noisy.sum())),
            "clean_web_kept": int((web_kept & ~noisy).sum()) / max(1, int((~noisy).sum())),
            "web_itm_auc": auc,  # ROC-AUC of the web text's ITM probability, clean (positive) vs noisy
            "text_accuracy": {
                "web": acc(web_acc),
                "web_kept": acc([a for a, k in zip(web_acc, web_kept, strict=True) if k]),
                "synthetic": acc([a for a, _ in syn]),
                "synthetic_kept": acc([a for a, k in syn if k]),
            },
        }

    def uses_warmup(self) -> bool:
        c = self.cfg
        return c.warmup_vision and not (c.init or c.web or c.pretrain.get("init_vision"))

    def warmup(self) -> dict[str, Any]:
        from pipelines.train.warmup import WarmupSettings, warmup_vision

        s = WarmupSettings.load(self.cfg.warmup_config, **{"seed": self.cfg.seed, **self.cfg.warmup,
                                                                 "output": self.path("warmup_vision")})  # fmt: skip
        return warmup_vision(s)

    def pretrain_overrides(self, tokenizer: str, vision: str | None = None) -> dict[str, Any]:
        """Every pretraining arm starts from the same point: `init` (with its own tokenizer), or from scratch with the
        synthetic world's tokenizer and (`vision`) the warmed-up ViT."""
        c = self.cfg
        if c.init:
            return {**c.pretrain, "init": c.init}
        return {**c.pretrain, "tokenizer": tokenizer, **({"init_vision": vision} if vision else {})}

    def arm(
        self, name: str, corpus: str, data: dict[str, Any], steps: int | None = None, **names: str
    ) -> dict[str, Any]:
        """One row of the table: pretrain on `corpus`, then fine-tune a captioner (and with `retrieval_eval:
        finetuned` a retrieval model) from it on the clean set by the loop's captioner and filter recipes, as the
        paper's Table 1 evaluates each pretrained model after fine-tuning on COCO (Caption-FT, Retrieval-FT)."""
        c, clean = self.cfg, data["clean"]
        steps_of = {"pretrain": f"pretrain_{name}", "caption": f"finetune_captioner_{name}",
                    "retrieval": f"finetune_retrieval_{name}", **names}  # fmt: skip
        dirs = {k: v.removeprefix("finetune_") for k, v in steps_of.items()}
        pre = self.step(steps_of["pretrain"], lambda: self.train(
            "pretrain", c.pretrain_config, self.pretrain_overrides(data["tokenizer"], data.get("vision")), steps,
            data=corpus,
            output=self.path(dirs["pretrain"])))  # fmt: skip
        cap = self.step(steps_of["caption"], lambda: self.train(
            "caption", c.caption_config, c.finetune_caption, data=clean, init=pre["output"],
            output=self.path(dirs["caption"])))  # fmt: skip
        out = {"pretrain": pre, "captioner": cap}
        if c.retrieval_eval == "finetuned" or "retrieval" in names:  # the noisy arm's is the filter: always made
            out["retrieval"] = self.step(steps_of["retrieval"], lambda: self.train(
                "retrieval", c.retrieval_config, c.finetune_retrieval, data=clean, init=pre["output"],
                output=self.path(dirs["retrieval"])))  # fmt: skip
        return out

    def run(self) -> dict[str, Any]:
        c = self.cfg
        data = self.step("data", self.data)
        warm = self.step("warmup_vision", self.warmup) if self.uses_warmup() else None
        if warm:
            data = {**data, "vision": warm["output"]}
        # the noisy arm's captioner and retrieval model are the loop's captioner and filter (paper: both fine-tuned
        # on COCO from the model pretrained on the noisy web corpus)
        noisy = self.arm("noisy", f"{data['web']},{data['clean']}", data, caption="finetune_captioner",
                         retrieval="finetune_filter")  # fmt: skip
        cap0, filt = noisy["captioner"]["output"], noisy["retrieval"]["output"]
        run = self.step("capfilt", lambda: self.run_capfilt(data, cap0, filt))
        steps = noisy["pretrain"]["steps"] if c.equal_steps else None
        arms = {"no bootstrap": noisy}
        if c.filter_only:  # the same filter over the same web corpus, without the captioner's captions
            self.step("capfilt_filter_only", lambda: self.run_capfilt(
                data, cap0, filt, "capfilt_filter_only", num_captions=0))  # fmt: skip
            arms["F"] = self.arm(
                "filter_only", f"{self.path('capfilt_filter_only', 'tars')},{data['clean']}", data, steps
            )
        arms["C+F"] = self.arm("capfilt", f"{self.path('capfilt', 'tars')},{data['clean']}", data, steps)
        evals = {"no bootstrap": "noisy", "F": "filter_only", "C+F": "capfilt"}
        rows, ft = {}, c.retrieval_eval == "finetuned"
        for row, a in arms.items():
            ret, cap = a["retrieval" if ft else "pretrain"]["output"], a["captioner"]["output"]
            # one marker and folder per protocol: switching `retrieval_eval` in a workdir never reuses the other's
            name = ("ft_" if ft else "") + evals[row]
            rows[row] = self.step(f"eval_{name}", partial(self.evaluate, ret, cap, data["test"], name))
        fq = self.step("filter_quality", lambda: self.filter_quality(data))
        pre = {row: a["pretrain"] for row, a in arms.items()}
        eval_dirs = {row: self.path("eval", ("ft_" if ft else "") + evals[row]) for row in arms}
        report = {"config": asdict(c), "rows": rows, "paired": paired_differences(eval_dirs), "filter": fq,
                  "capfilt_run": run, "pretrain": pre, "warmup_vision": warm, "seconds": self.seconds}  # fmt: skip
        (self.dir / "bootstrap_report.json").write_text(json.dumps(report, indent=2, default=str))
        self.echo(format_report(report))
        self.echo(f"report: {self.dir / 'bootstrap_report.json'}")
        return report


def roc_auc(positive: Any, negative: Any) -> float | None:
    """P(score of a random positive > score of a random negative), ties counting half (Mann-Whitney U / n+ n-)."""
    import numpy as np

    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if not len(pos) or not len(neg):
        return None
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    ranks[order] = np.arange(1, len(allv) + 1)
    for v in np.unique(allv):  # average ranks over ties
        tie = allv == v
        ranks[tie] = ranks[tie].mean()
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


# the table's columns: (report section, metric, header, width in format_report)
COLUMNS = [("retrieval", "txt_r1", "TR@1", 7), ("retrieval", "txt_r5", "TR@5", 7), ("retrieval", "img_r1", "IR@1", 7),
           ("retrieval", "img_r5", "IR@5", 7), ("caption", "bleu4", "BLEU-4", 8), ("caption", "cider", "CIDEr", 8),
           ("caption", "synth_attribute_accuracy", "attr acc", 10)]  # fmt: skip


# what `paired` compares, per test query: R@1 hits (from each query's rank), per-image CIDEr and attribute accuracy
PAIRED = {"TR@1": ("retrieval", "image_to_text"), "IR@1": ("retrieval", "text_to_image"),
          "CIDEr": ("caption", "cider"), "attr acc": ("caption", "synth_attribute_accuracy")}  # fmt: skip


def paired_difference(base: Any, other: Any) -> dict[str, float]:
    """Mean of `other - base` over the same test queries and its standard error (the paired SE: the two models'
    shared per-query difficulty cancels, so it is far smaller than either metric's own sampling error)."""
    import numpy as np

    d = np.asarray(other, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"diff": float(d.mean()), "se": se, "n": len(d)}


def _per_query(eval_dir: str) -> dict[str, dict[str, float]]:
    """Per test query scores of one evaluation folder (eval_retrieval.json, eval_caption.json), in percent, keyed by
    the query (image key; image key#text for text->image). An eval JSON without query keys keys by position."""
    out: dict[str, dict[str, float]] = {}
    for name, (task, key) in PAIRED.items():
        p = Path(eval_dir) / f"eval_{task}.json"
        if not p.is_file():
            continue
        res = json.loads(p.read_text())
        if task == "retrieval" and key in res.get("ranks", {}):
            ranks = res["ranks"][key]
            keys = res.get("query_keys", {}).get(key) or [str(i) for i in range(len(ranks))]
            out[name] = {k: 100.0 * (r < 1) for k, r in zip(keys, ranks, strict=True)}
        elif task == "caption" and key in res.get("per_image", {}):
            out[name] = dict(res["per_image"][key])
    return out


def paired_differences(eval_dirs: dict[str, str], base: str = "no bootstrap") -> dict[str, dict[str, Any]]:
    """Each row against `base` on the same test set: {row: {metric: {diff, se, n}}}, from the eval folders. Queries
    are matched by key; two rows scored on different test sets are an error, not a silent mismatch."""
    ref = _per_query(eval_dirs[base])
    out: dict[str, dict[str, Any]] = {}
    for row, d in eval_dirs.items():
        if row == base:
            continue
        mine = _per_query(d)
        out[row] = {}
        for m in PAIRED:
            if m not in ref or m not in mine:
                continue
            if mine[m].keys() != ref[m].keys():
                raise ValueError(
                    f"{m}: {d} and {eval_dirs[base]} were scored on different test queries "
                    f"({len(mine[m])} and {len(ref[m])}, {len(mine[m].keys() ^ ref[m].keys())} not in both)"
                )
            keys = sorted(ref[m])
            out[row][m] = paired_difference([ref[m][k] for k in keys], [mine[m][k] for k in keys])
    return out


def _metric(row: dict[str, Any], sec: str, m: str) -> float:
    """One metric of a table row; nan when not measured (no ground truth for attribute accuracy)."""
    v = row[sec].get(m)
    return float("nan") if v is None else float(v)


def format_report(report: dict[str, Any]) -> str:
    """The paper's Table 1 shape: one row per pretraining corpus."""
    lines = [f"{'pretraining corpus':<20}" + "".join(f"{h:>{w}}" for _, _, h, w in COLUMNS)]
    for name, row in report["rows"].items():
        cells = "".join(f"{_metric(row, sec, m):{w}.1f}" for sec, m, _, w in COLUMNS)
        lines.append(f"{name:<20}{cells}")
    for name, diffs in (report.get("paired") or {}).items():
        if diffs:
            ns = sorted({v["n"] for v in diffs.values()})
            lines.append(
                f"{name} - no bootstrap, paired over the same {'/'.join(map(str, ns))} test queries (diff ± SE): "
                + ", ".join(f"{m} {v['diff']:+.1f} ± {v['se']:.1f}" for m, v in diffs.items())
            )
    pre = report.get("pretrain") or {}
    if pre:
        lines.append(
            "pretraining: "
            + "; ".join(f"{k} {v.get('samples')} samples, {v.get('steps')} steps" for k, v in pre.items())
        )
    warm = report.get("warmup_vision")
    if warm:
        acc = warm["test_accuracy"]
        lines.append(
            "ViT warm-up (both arms start from it), held-out: "
            + ", ".join(f"{k} {acc[k]:.1%}" for k in ("shape", "color", "size") if k in acc)
        )
    f = report["filter"]
    if "drop_precision" in f:
        lines.append(
            f"filter: drops noisy web texts with precision {f['drop_precision']:.2f}, recall {f['drop_recall']:.2f}; "
            f"keeps {f['clean_web_kept']:.0%} of clean web texts and {f['synthetic_kept']:.0%} of synthetic captions"
        )
    else:  # no ground truth: what it kept
        lines.append(
            f"filter: keeps {f['web_kept']:.0%} of web texts and {f['synthetic_kept']:.0%} of synthetic captions"
        )
    auc = f.get("web_itm_auc") or {}
    if auc.get("all") is not None:
        lines.append(
            "filter ROC-AUC, clean vs noisy web texts: "
            + ", ".join(f"{k} {v:.3f}" for k, v in auc.items() if v is not None)
        )
    ta = f.get("text_accuracy") or {}
    if ta.get("web", {}).get("accuracy") is not None:
        names = {"web": "web", "web_kept": "web kept", "synthetic": "synthetic", "synthetic_kept": "synthetic kept"}
        lines.append(
            "text attribute accuracy (exactly right): "
            + ", ".join(
                f"{names[k]} {v['accuracy']:.1f} ({v['exact']:.0f}%)"
                for k, v in ta.items()
                if v["accuracy"] is not None
            )
        )
    if report.get("seconds"):
        secs = report["seconds"]
        lines.append(
            f"time: {sum(secs.values()) / 60:.1f} min (" + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items()) + ")"
        )
    if f["samples_kept"] == 0:
        lines.append(
            "warning: the filter kept no web sample (no text reached the ITM threshold), so the C+F corpus is the clean set "
            "alone (see the README, 'What the demo shows')"
        )
    return "\n".join(lines)


def aggregate_seeds(reports: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per row and metric over seeds: mean, sample std (ddof 1), the values; per metric the C+F - no bootstrap
    difference (mean, std, its standard error std/sqrt(n), and in how many seeds C+F was higher); and the filter's
    ROC-AUC per noise kind and, with ground truth, the share of noisy web texts it drops and of clean ones it keeps."""
    import numpy as np

    def stats(values: list[float]) -> dict[str, Any]:
        v = np.asarray(values, dtype=np.float64)
        return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "values": values}

    def num(v: Any) -> float:
        return float("nan") if v is None else float(v)

    n = len(reports)
    rows: dict[str, Any] = {}
    names = [k for k in next(iter(reports.values()))["rows"] if all(k in r["rows"] for r in reports.values())]
    for row in names:
        rows[row] = {m: stats([_metric(r["rows"][row], sec, m) for r in reports.values()]) for sec, m, _, _ in COLUMNS}
    diff = {}
    for sec, m, _, _ in COLUMNS:
        d = [_metric(r["rows"]["C+F"], sec, m) - _metric(r["rows"]["no bootstrap"], sec, m) for r in reports.values()]
        s = stats(d)
        # each seed draws its own world and test set, so the spread over seeds holds test-set and training noise
        diff[m] = {**s, "se": s["std"] / np.sqrt(n), "cf_higher": sum(x > 0 for x in d)}
    filters = [r["filter"] for r in reports.values()]
    kinds = list(dict.fromkeys(k for f in filters for k in (f.get("web_itm_auc") or {})))
    filt = {
        "web_itm_auc": {k: stats([num((f.get("web_itm_auc") or {}).get(k)) for f in filters]) for k in kinds},
        **{k: stats([num(f.get(k)) for f in filters]) for k in ("drop_recall", "clean_web_kept", "synthetic_kept")},
    }
    auc = filt["web_itm_auc"].get("all") or stats([float("nan")] * n)
    return {"seeds": sorted(reports), "rows": rows, "difference": diff, "filter": filt, "filter_auc": auc}


def _se(se: float) -> str:
    """One decimal, or two when one would print a seed spread of 0.0 (three seeds that agree to 0.1)."""
    return f"{se:.2f}" if se < 0.05 else f"{se:.1f}"


def format_seeds(agg: dict[str, Any]) -> str:
    n = len(agg["seeds"])
    lines = [f"mean ± std over {n} seeds ({', '.join(map(str, agg['seeds']))})"]
    lines.append(f"{'pretraining corpus':<20}" + "".join(f"{h:>14}" for _, _, h, _ in COLUMNS))
    for name, row in [*agg["rows"].items(), ("C+F - no bootstrap", agg["difference"])]:
        cells = "".join(f"{row[m]['mean']:8.1f} ±{row[m]['std']:4.1f}" for _, m, _, _ in COLUMNS)
        lines.append(f"{name:<20}{cells}")
    higher = [f"{agg['difference'][m]['cf_higher']}/{n}" for _, m, _, _ in COLUMNS]
    lines.append(f"{'C+F higher in':<20}" + "".join(f"{h:>14}" for h in higher) + " seeds")
    d = agg["difference"]
    lines.append(
        f"C+F - no bootstrap, mean ± SE over the {n} seeds (std/√{n}): "
        + ", ".join(f"{h} {d[m]['mean']:+.1f} ± {_se(d[m]['se'])}" for _, m, h, _ in COLUMNS)
    )
    f = agg.get("filter") or {}
    if f and not math.isnan(f["drop_recall"]["mean"]):  # the web corpus has ground truth (the synthetic world's)
        lines.append(
            f"filter: drops {f['drop_recall']['mean']:.0%} ± {f['drop_recall']['std']:.0%} of noisy web texts, keeps "
            f"{f['clean_web_kept']['mean']:.0%} ± {f['clean_web_kept']['std']:.0%} of clean ones"
        )
    aucs = f.get("web_itm_auc") or {"all": agg["filter_auc"]}
    lines.append(
        "filter ROC-AUC, clean vs noisy web texts: "
        + ", ".join(f"{k} {v['mean']:.3f} ± {v['std']:.3f}" for k, v in aucs.items())
    )
    return "\n".join(lines)


def bootstrap(
    config: str,
    workdir: str | None = None,
    init: str | None = None,
    set_items: tuple[str, ...] = (),
    seeds: list[int] | None = None,
) -> dict[str, Any]:
    """One loop; or with `seeds`, one loop per seed in `workdir/seed_N` (data, initialisation, data order and
    augmentations all follow the seed) and the mean ± std table, written to `workdir/bootstrap_seeds.json`."""
    from pipelines.settings import overrides

    cfg = BootstrapSettings.load(_preset(config), **overrides(set_items, workdir=workdir, init=init))
    if not seeds:
        return Bootstrap(cfg).run()
    root, reports = Path(cfg.workdir), {}
    for seed in seeds:
        one = replace(cfg, seed=seed, workdir=str(root / f"seed_{seed}"))
        print(f"=== seed {seed}: {one.workdir}")
        reports[seed] = Bootstrap(one).run()
    agg = aggregate_seeds(reports)
    root.mkdir(parents=True, exist_ok=True)
    (root / "bootstrap_seeds.json").write_text(json.dumps(agg, indent=2))
    print(format_seeds(agg))
    print(f"report: {root / 'bootstrap_seeds.json'}")
    return agg
