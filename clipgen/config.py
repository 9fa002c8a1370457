"""Structured config schema. Registered in Hydra's ConfigStore as ``clipgen_schema``; ``conf/config.yaml`` puts it
first in its defaults list, so every group file and command-line override is checked against these dataclasses
(a misspelt key or a wrong type fails at compose time with Hydra's own message)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig

from clipgen.facts import DEFAULT_JPEG_QUALITY, PAPER_CAPTION_SEED


@dataclass
class PathsConfig:
    # Every output (world, recipes, runs, report, logs) goes under this directory.
    root: str = "${oc.env:CLIPGEN_ROOT,./runs}"


@dataclass
class WorldConfig:
    name: str = MISSING  # short name of this world preset; part of its output directory name
    seed: int = 0  # every random choice of the generator flows from this seed
    num_classes: int = 30  # world classes, drawn from DomainNet's class names
    # how many of heldout.classes (C2) are forced into the world's classes: 10 of 30, so a model that answers one
    # held-out class for every image scores 0.1 on them (3x chance), not 0.2 as with 5
    num_heldout: int = 10
    num_distractors: int = 15  # classes that appear only in the natural base corpus
    train_per_class: int = 60  # train images per domain x class before the per-domain scale
    test_per_class: int = 40  # test images per domain x class before the per-domain scale
    base_per_class: int = 40  # natural base-corpus images per class (world + distractor classes)
    # Per-domain size factors (DomainNet is uneven: quickdraw and real large, clipart small).
    domain_scale: Dict[str, float] = field(default_factory=lambda: {
        "clipart": 0.6, "infograph": 0.7, "painting": 0.9, "quickdraw": 1.5, "real": 1.5, "sketch": 0.8})
    render_px: int = 64  # images are drawn at this size ...
    # ... and box-downsampled (or, drawn smaller, bilinearly upscaled) to this size on disk; follows the model's
    # input size unless set explicitly
    image_px: int = II("model.image_px")
    # png (lossless, {domain}_{label}_{i}.png) | jpg (as the real data: DomainNet .jpg, ImageNet .JPEG)
    image_format: str = "png"
    # natural corpus only for classes with an ImageNet wnid, in ImageNet's folders (as ImageNet-Captions is);
    # false: every world class, unmapped ones in dn{label:03d} folders
    base_imagenet_only: bool = False
    workers: int = 2  # processes used to render (0 or 1 = in-process)


@dataclass
class DataConfig:
    source: str = "world"  # where DomainNet-layout images come from: world | domainnet
    domainnet_root: Optional[str] = None  # real DomainNet directory ({domain}/{class}/..., {domain}_{split}.txt)
    base: str = "world"  # base corpus: world (the world's natural corpus) | imagenet_captions | cc | none
    imagenet_captions_json: Optional[str] = None  # imagenet_captions.json when base=imagenet_captions
    imagenet_train_root: Optional[str] = None  # ImageNet train folder ({wnid}/{file}) when base=imagenet_captions
    # base=cc: img2dataset webdataset shards of CC3M/CC12M ({key}.jpg + {key}.txt): a brace pattern or glob of
    # plain .tar paths, several joined by '::' (e.g. /data/cc3m/{00000..00331}.tar)
    cc_shards: Optional[str] = None
    use_imagenet_sketch: bool = False  # add ImageNet-Sketch's DomainNet-class sketches to the sketch candidates
    imagenet_sketch_root: Optional[str] = None  # ImageNet-Sketch folder ({wnid}/{file}) when use_imagenet_sketch
    # source=domainnet: a class present in some domains' split files but absent from another is an error unless
    # this is true (real DomainNet has every class in every domain)
    allow_missing_classes: bool = False
    index_cache: bool = True  # keep source indexes under paths.root/cache, re-read when an input file changes
    val_fraction: float = 0.05  # share of each domain x class train list carved out as validation
    val_seed: int = 0  # the carve-out is a stable hash of (val_seed, sample id)
    # Training loader: memory (clipgen.train.data: every image decoded into memory once) | stream
    # (clipgen.train.stream: images read from the shards batch by batch in DataLoader workers; same batches) |
    # auto (memory while the decoded images, N x 3 x px x px bytes, fit max_memory_gb, else stream)
    loader: str = "auto"
    workers: int = 2  # processes checking/decoding shards and (stream) assembling batches; any count, same data
    on_bad_sample: str = "error"  # error: stop, naming the shard and key | skip: leave out, count in meta.json
    max_memory_gb: float = 16.0  # the most decoded image bytes the memory loader may hold


@dataclass
class HeldoutConfig:
    name: str = MISSING  # name of this held-out set
    classes: List[str] = MISSING  # C2: classes removed from the test domain (caption spelling)


@dataclass
class RecipeConfig:
    # natural_only | cg_low | cg_high | lod | cg_low_pseudo | cg_high_pseudo | allow | interpolation
    kind: str = MISSING
    test_domain: str = "sketch"  # D: clipart | infograph | painting | quickdraw | sketch
    allow_p: float = 0.0  # kind=allow: fraction of each held-out class of D kept
    allow_base: str = "cg_high"  # kind=allow: cg_low (real + D) or cg_high (all six domains)
    extra_domains: List[str] = field(default_factory=list)  # kind=interpolation: domains added to real + D
    aligned_captions: bool = False  # captions use only neutral terms ("image", "picture"), never a domain word
    subsample: str = "first"  # first (paper: first n in split-file order) | random (seeded)
    seed: int = 0  # seed of the random subsample variant
    caption_seed: int = PAPER_CAPTION_SEED  # seed of the caption templates (the paper's: 42)
    # images are resized to this size when written into shards; follows the model's input size unless set (a
    # recipe for training must match model.image_px: clipgen.preflight refuses a mismatch before any build)
    image_px: int = II("model.image_px")
    # png (lossless) | jpg | auto: the data source's (clipgen.facts.RECIPE_IMAGE_FORMAT: png for the world, jpg
    # for DomainNet and the paper presets)
    image_format: str = "auto"
    jpeg_quality: int = DEFAULT_JPEG_QUALITY  # of re-encoded images (1..100; PIL's 4:2:0 chroma subsampling)
    shard_size: int = 2000  # samples per shard (upper bound)
    min_shards: int = 2  # at least this many shards (workers x ranks)
    # processes writing shards (each writes whole shards; any count writes the same bytes); null = every core this
    # process may run on, 1 = in this process
    workers: Optional[int] = None
    dry_run: bool = False  # print the plan as a domain x class table and write nothing


@dataclass
class ModelConfig:
    # open_clip model name: a built-in config (RN50, ViT-B-32, ...) or one shipped in clipgen/resources/models
    name: str = MISSING
    image_px: int = MISSING  # training/eval image size: each model preset states its own (its config's image_size)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw (CLIP, paper) | sgd (supervised baseline: SGD with momentum)
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.2  # weight decay (never on gains, biases, norms, logit scale)
    beta1: float = 0.9  # adamw
    beta2: float = 0.999  # adamw
    eps: float = 1e-8  # adamw
    momentum: float = 0.9  # sgd
    nesterov: bool = True  # sgd
    schedule: str = "cosine"  # cosine (linear warmup, then cosine to 0) | step (x gamma at each milestone epoch)
    warmup_steps: int = 500  # linear warmup steps (both schedules; 0 = none)
    milestones: List[int] = field(default_factory=list)  # step schedule: epochs at which lr is multiplied by gamma
    gamma: float = 0.1  # step schedule factor


@dataclass
class TrainerConfig:
    seed: int = 0  # model init, data order and augmentation all flow from this seed
    epochs: int = 32  # an epoch = one pass over recipe + base corpus (sizes from the recipe's manifest)
    batch_size: int = 128  # global batch (all ranks, all accumulation steps)
    precision: str = "fp32"  # fp32 | bf16 (CPU autocast) | amp (fp16 + GradScaler, CUDA only)
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch intra-op threads (0 = torch's default)
    log_every: int = 50  # steps between log lines / W&B points
    progress_bar: bool = True  # a tqdm bar when stderr is a terminal (a study turns it off and draws one line)
    save_every_steps: int = 200  # steps between latest.pt saves (plus every epoch end and on a stop signal)
    max_steps: int = -1  # stop after this many steps (debugging); -1 = the full schedule
    sync_bn: bool = False  # DDP on CUDA: SyncBatchNorm, so ResNets' batch statistics span the global batch
    requeue: bool = True  # in a SLURM job: after SIGUSR1/SIGUSR2 and saving latest.pt, requeue it (scontrol requeue)
    objective: str = "clip"  # clip (contrastive, open_clip's ClipLoss) | supervised (protocol §5 baseline, 1345-way)
    save_every_epochs: int = 1  # epoch checkpoints every this many epochs (and after the last); epoch 0 always
    checkpoint_dtype: str = "fp32"  # fp32 | fp16: epoch checkpoints' stored weights (latest.pt stays fp32)
    # Memory/speed options that leave the result unchanged (up to float rounding):
    accum_steps: int = 1  # split each (per-rank) batch into this many micro-batches; the loss is still the full batch's
    grad_checkpointing: bool = False  # recompute activations in backward (transformer blocks, ResNet bottlenecks)
    channels_last: bool = False  # NHWC memory format for convolutions (faster on recent GPUs)
    compile: bool = False  # torch.compile the model


@dataclass
class EvalConfig:
    templates: str = "paper86"  # paper86 (80 OpenAI + 6 domain templates) | domain_free
    # 0 = every template of eval.templates; N > 0 = only its first N (debug=rehearsal: 345 classes x 86 templates
    # of RN50's text tower take ~30 CPU minutes per checkpoint). Recorded with every result; not the paper's head.
    max_templates: int = 0
    batch_size: int = 512  # images per forward pass
    run_dir: Optional[str] = None  # evaluate this run directory instead of the one the config names
    save_outputs: bool = True  # keep predictions, logits and embeddings per checkpoint
    # ImageNet val as {root}/{wnid}/*.JPEG: adds the task imagenet-val (1000-way top-1/top-5) for CLIP runs.
    imagenet_val_root: Optional[str] = None
    # Cheap zero-shot evaluation at every epoch end inside the trainer, logged to its W&B run as
    # eval/<task>-subset/<metric>; writes nothing to results.jsonl (clipgen-eval stays the source of truth).
    during_training: bool = False
    subset_per_class: int = 10  # during_training: at most this many test images per class and domain


@dataclass
class ExportConfig:
    # clipgen-export (clipgen.export): a CLIP run's checkpoint as a folder plain open_clip loads
    # (open_clip.create_model_and_transforms("local-dir:<folder>"), no clipgen needed; clipgen.models.export)
    run_dir: Optional[str] = None  # the run to export; null = the run the config names (recipe, model, seed)
    epoch: int = -1  # the checkpoint to export (-1 = the run's last)
    dir: Optional[str] = None  # where to write it; null = {run}/export/epoch_NNN
    after_training: bool = True  # clipgen-train exports the last checkpoint of every CLIP run it finishes


@dataclass
class AnalysisConfig:
    # clipgen-analyze (clipgen.analyze): which analyses to run over which runs' checkpoints.
    run_dirs: List[str] = field(default_factory=list)  # run directories; empty = every run under paths.root/runs
    analyses: List[str] = field(default_factory=lambda: ["sae", "geometry", "cka", "circuits"])
    # checkpoints to analyse, each into {run}/analysis/epoch_NNN/ (-1 = the run's last evaluated epoch; add 0 for
    # the untrained model, the baseline every sharing measure is read against)
    epochs: List[int] = field(default_factory=lambda: [-1])
    seed: int = 0  # every random choice of the analyses (SAE init and batches, UMAP, subsamples)
    images_per_group: int = 50  # test images per domain x class (all six domains), picked by a seeded hash
    # visual layers extracted and compared by CKA (stem, layer1.0, ..., attnpool / block0, ..., head); [] = all.
    # Circuits always use every layer (edges join consecutive layers).
    layers: List[str] = field(default_factory=list)
    batch_size: int = 256  # images per forward pass
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch intra-op threads (0 = torch's default)
    # SAE feature sharing (protocol §7): SAE on L2-normalised final image embeddings
    sae_expansion: int = 4  # features = expansion x embedding dim (paper: 4096 on RN50's 1024)
    sae_l1: float = 1e-4  # L1 coefficient of the loss
    sae_lr: float = 1e-4  # Adam learning rate
    sae_batch_size: int = 2048  # capped by the number of training rows
    sae_steps: int = 3000  # optimisation steps
    sae_fit_split: str = "train"  # images the SAE is fitted on: train (all six domains) | test (the analysed ones)
    sae_fit_per_group: int = 200  # at most this many fitting images per domain x class
    sae_top_active: int = 20  # each image contributes its top-N active features to the histograms
    sae_ks: List[int] = field(default_factory=lambda: [5, 10, 15, 20])  # k of the top-k overlaps, averaged
    sae_vocab_file: Optional[str] = None  # concepts, one per line; null = the run's classes + domain words
    sae_named_features: int = 20  # name this many most frequent features per domain
    # Embedding geometry
    umap: bool = True  # draw the UMAP plots (first import of umap compiles numba code for ~15 s)
    umap_max_points: int = 5000  # seeded subsample of the test embeddings for UMAP
    umap_neighbors: int = 15  # UMAP n_neighbors
    # Representational similarity
    cka_kernels: List[str] = field(default_factory=lambda: ["linear", "rbf"])  # linear | rbf (median bandwidth)
    # Circuits
    circuit_steps: int = 10  # integrated-gradient steps (zero baseline)
    circuit_top_frac: float = 0.1  # share of channels kept as nodes per layer
    circuit_top_edges: int = 3  # incoming edges (largest |weight|) per kept node
    circuit_classes: str = "heldout"  # classes analysed: heldout (C2) | all
    circuit_images_per_group: int = 50  # images per domain x class for circuits
    # activation elements per IG batch (memory budget; raise on a GPU). On CPU smaller batches are faster: one
    # default-world run's circuits took 99 CPU s and 3.0 GB at 1e8, 65 CPU s and 1.3 GB at 5e6 (same results)
    circuit_max_batch_elems: int = 5000000
    circuit_wl_iterations: int = 2  # Weisfeiler-Lehman refinements of the whole-circuit graph kernel (paper: h=2)


@dataclass
class DiffConfig:
    # clipgen-diff (clipgen.diff): explain how run B behaves differently from run A (protocol §8).
    epoch: int = -1  # checkpoint whose evaluation outputs are compared (-1 = last epoch both runs evaluated)
    alpha: float = 0.01  # acceptance margin: predicted side's share must exceed the other's by this much
    seed: int = 0  # discovery/verification split and every other random choice
    generators: List[str] = field(default_factory=lambda: ["slice_diff", "cluster", "sae"])  # hypothesis generators
    tau: float = 0.1  # behaviour true_prob: minimum difference in true-class probability
    confident: float = 0.5  # behaviour confident_error: minimum top probability of a wrong prediction
    fdr_q: float = 0.05  # Benjamini-Hochberg level of the generators, and slice_diff's child-vs-parent test level
    min_slice: int = 10  # smallest slice (discovery images) a hypothesis may speak about
    max_hypotheses: int = 50  # per generator, strongest first
    cluster_max_points: int = 4000  # cluster: discordant images clustered at most (seeded subsample)
    cluster_pca_dim: int = 8  # cluster: PCA components kept of each run's embeddings
    # sae: a crosscoder (shared sparse code, a decoder per run) on both runs' embeddings of the discovery images;
    # latents whose activation differs most between A-wins and B-wins become hypotheses (clipgen/diff/generators/sae.py)
    sae_latents: int = 256  # dictionary size
    sae_pca_dim: int = 64  # each run's embedding rotated onto this many principal directions (the tiny model's 64: all)
    sae_steps: int = 300  # Adam steps
    sae_batch_size: int = 256
    sae_lr: float = 3e-3
    sae_l1: float = 0.02  # L1 weight on codes x decoder norms (reconstruction error is averaged over dimensions)
    sae_max_points: int = 20000  # discovery images the dictionary is fitted on at most (seeded subsample)
    sae_vocab_file: Optional[str] = None  # concepts, one per line, to name latents by (loads both runs' text towers)
    # clipgen-diff without run_a/run_b: the methods comparison over a study's runs (diff=design_contrasts). Each
    # contrast [A, B] names two study recipe entries; every seed of study.seeds is diffed, plus seed-null pairs
    # (seeds 0-1, 2-3, ... of every recipe in the contrasts); one table per generator, mean [95% CI] over seeds.
    contrasts: List[List[str]] = field(default_factory=list)
    recall_contrast: List[str] = field(default_factory=list)  # [A, B] of contrasts: is "B better on D x C2" found?
    recall_top: int = 5  # ... among each generator's top this many accepted hypotheses
    top_k: int = 10  # top hypotheses shown in summary.md and the report
    evidence: int = 5  # evidence image ids per hypothesis
    # Optional LLM (off by default; never downloads): paraphrases hypotheses and rates them as the paper's
    # autorater; its agreement with the rule-based scores is reported. none | openai (endpoint on localhost) |
    # llama_cpp (a local GGUF file through the llama_cpp package)
    llm_backend: str = "none"
    llm_endpoint: Optional[str] = None  # openai: e.g. http://127.0.0.1:8080/v1 (llama.cpp's llama-server)
    llm_model: Optional[str] = None  # openai: model name sent to the endpoint
    llm_model_path: Optional[str] = None  # llama_cpp: path of the GGUF model file
    llm_max_hypotheses: int = 20  # hypotheses sent to the LLM (accepted first, strongest first)


@dataclass
class LoggerConfig:
    backend: str = "wandb"  # wandb | none
    mode: str = "offline"  # offline (default, no key needed) | online | disabled
    project: str = "clipgen"
    group: Optional[str] = None  # W&B group; defaults to the study name
    tags: List[str] = field(default_factory=list)  # W&B tags (experiments set theirs)


@dataclass
class SlurmJobConfig:
    partition: Optional[str] = None  # null = the cluster's default partition
    account: Optional[str] = None
    qos: Optional[str] = None
    timeout_min: int = 1440
    nodes: int = 1
    tasks_per_node: int = 1  # one task per GPU: DDP over srun
    gpus_per_node: int = 0
    cpus_per_task: int = 8
    mem_gb: int = 64
    signal_delay_s: int = 180  # USR2 this long before the time limit (and at preemption): save, requeue
    max_num_timeout: int = 5  # requeues after time limits / preemptions (safe: training resumes exactly)
    setup: List[str] = field(default_factory=list)  # shell lines run before the job (module load, conda ...)


@dataclass
class SlurmStageConfig:
    # study.launcher=slurm: one SLURM job per run for training and for evaluation (submitit); every value can be
    # overridden on the command line, e.g. study.slurm.train.partition=gpu study.slurm.train.gpus_per_node=4
    folder: str = "${paths.root}/logs/study/${study.name}"  # submitit's job scripts and logs
    train: SlurmJobConfig = field(default_factory=lambda: SlurmJobConfig(tasks_per_node=4, gpus_per_node=4,
                                                                         cpus_per_task=8, mem_gb=128))
    eval: SlurmJobConfig = field(default_factory=lambda: SlurmJobConfig(timeout_min=240, gpus_per_node=1,
                                                                        cpus_per_task=8, mem_gb=32,
                                                                        max_num_timeout=3))


@dataclass
class StudyConfig:
    name: str = MISSING  # study name (W&B group, report title)
    test_domains: List[str] = field(default_factory=lambda: ["sketch"])
    recipes: List[str] = field(default_factory=lambda: ["natural_only", "cg_low", "cg_high", "lod"])
    seeds: List[int] = field(default_factory=lambda: [0])
    # Runs trained/evaluated at once on this machine (separate processes, each with trainer.threads threads).
    # On a small CPU, 2 one-thread processes beat one 2-thread process for tiny models. With 2 or more, a run is
    # evaluated as soon as its training ended, while the others still train.
    parallel: int = 1
    dry_run: bool = False  # list the study's runs and what each still needs, launch nothing
    analyze: bool = False  # after evaluation, run clipgen-analyze on every run (settings: analysis.*)
    # local (processes here) | submitit_local (submitit jobs here) | slurm (one submitit job per run and stage)
    launcher: str = "local"
    slurm: SlurmStageConfig = field(default_factory=SlurmStageConfig)


@dataclass
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    data: DataConfig = field(default_factory=DataConfig)
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    diff: DiffConfig = field(default_factory=DiffConfig)
    run_a: Optional[str] = None  # clipgen-diff: run A (a run directory, or a run name under paths.root/runs)
    run_b: Optional[str] = None  # clipgen-diff: run B
    null_run: Optional[str] = None  # clipgen-diff: another seed of A's configuration (false-discovery control)
    run_name: Optional[str] = None  # run directory name; default derived from recipe id, model and seed


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore, once per process: storing converts the dataclasses again, and a
    schema stored anew makes the next composition slower too (benchmarks/study_overhead.py)."""
    store = ConfigStore.instance()
    if "clipgen_schema.yaml" not in store.repo:
        store.store(name="clipgen_schema", node=Config)


def copy_config(cfg: DictConfig) -> DictConfig:
    """A deep copy of a composed config: the same nodes, types and flags as ``copy.deepcopy``, by a pickle round
    trip (~2.5x faster; a study takes a few per run)."""
    import pickle

    return pickle.loads(pickle.dumps(cfg))


def compose_config(overrides: list[str]):
    """The config a console script gets for ``clipgen-x <overrides>``, composed in Python (scripts, benchmarks,
    tests, notebooks)."""
    from hydra import compose, initialize_config_module

    register_configs()
    with initialize_config_module(config_module="clipgen.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))

