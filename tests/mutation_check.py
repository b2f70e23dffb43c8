"""Apply one mutation (a deliberate bug) to the code, run the tests meant to catch it, and put the
code back.

    python tests/mutation_check.py --list            # the mutations, one a line
    python tests/mutation_check.py --check           # every anchor found once, every test named
    python tests/mutation_check.py lr_not_applied    # one mutation: CAUGHT (and by which test)
    python tests/mutation_check.py --all             # every mutation, one after another (long)
    python tests/mutation_check.py NAME -- -n 0      # after --: options for pytest

Each mutation replaces one exact piece of text (its anchor), found exactly once in its file; the
file is restored afterwards whatever happens (also on Ctrl-C). When code moves or is renamed, the
anchors must follow it: --check names every anchor that no longer matches once, and every test
that no longer exists. Not collected by pytest (no test_ prefix). docs/testing.md holds the table
of results.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

TL = "tests/test_training_loop.py"
TRAIN = "tests/test_train.py::"
RESUME = TRAIN + "test_resume_halfway_matches_uninterrupted_run_bitwise"
TORCHRUN = TRAIN + "test_torchrun_two_processes_match_one_process_with_the_same_global_batch"
DIST_TASK = ("tests/test_distributed.py::test_torchrun_final_scores_on_a_task_with_dropout_"
             "are_one_process_scores_of_the_same_weights")
MODEL = "tests/test_model.py"
BY_HAND = "tests/test_model_by_hand.py"
SAMPLING = "tests/test_sampling.py"
SAMPLE = "tests/test_sample.py"
EVALUATE = "tests/test_evaluate.py"
# The line of train.py's build_model that takes the step and the best val loss from a checkpoint.
PROGRESS = "{k: saved.get(k, progress[k]) for k in progress}"

# (name, file, anchor, replacement, tests to run): the tests are pytest node ids or files, as few
# as catch the mutation.
MUTATIONS = [
    # --- issue 27's list
    ("lr_not_applied", "train.py", 'group["lr"] = group["peak_lr"] * lr / cfg.learning_rate',
     'group["lr"] = group["peak_lr"]', [TL]),
    ("clip_skipped", "tinygpt/optim.py", "torch.nn.utils.clip_grads_with_norm_(parameters, "
     "grad_clip, norm)", "pass", [TL]),
    ("no_unscale_before_clip", "tinygpt/optim.py", "scaler.unscale_(optimizer)", "pass", [TL]),
    ("best_val_not_restored", "train.py", PROGRESS,
     '{**{k: saved.get(k, progress[k]) for k in progress}, "best_val_loss": math.inf}', [TL]),
    ("temperature_multiplies", "model.py", "logits = logits.float() / temperature",
     "logits = logits.float() * temperature", [SAMPLING]),
    ("sample_ignores_sink_tokens", "sample.py", "generator=generator, sink_tokens=cfg.sink_tokens)",
     "generator=generator, sink_tokens=0)",
     [SAMPLING]),
    ("sample_ignores_top_k", "sample.py", "cfg.temperature, cfg.top_k,", "cfg.temperature, None,",
     [SAMPLING]),
    ("alibi_sign_flipped", "model.py", "bias = -self.alibi_slopes[:, None, None] * distance",
     "bias = self.alibi_slopes[:, None, None] * distance", [BY_HAND]),
    ("rope_turns_the_other_way", "model.py", "torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos)",
     "torch.cat((x1 * cos + x2 * sin, -x1 * sin + x2 * cos)", [BY_HAND]),
    ("full_split_shards_overlap", "tinygpt/data.py",
     "range(dist.rank * batch_size, len(picks), batch_size * dist.world_size)",
     "range(0, len(picks), batch_size)", [DIST_TASK]),
    ("exact_match_every_rank_scores_all", "tinygpt/data.py", "examples[dist.rank::dist.world_size]",
     "examples", [DIST_TASK]),
    ("no_per_rank_dropout_reseed", "train.py", "if dist.rank > 0:", "if False:",
     ["tests/test_distributed.py::test_torchrun_processes_draw_different_dropout"]),
    ("final_eval_not_on_best_pt", "train.py",
     "if run.best_step not in (None, run.step) and dist.from_master(best_path.is_file()):",
     "if False:", [TL]),
    ("newer_checkpoint_format_read", "tinygpt/checkpoint.py", "if version > FORMAT:", "if False:",
     [TRAIN + "test_a_checkpoint_this_model_py_cannot_compute_is_refused_in_one_line"]),
    # --- further mutations across train, sample, evaluate, checkpoint and the model
    ("windows_start_one_later", "tinygpt/data.py", "starts[:, None] + np.arange(self.seq_len + 1)",
     "starts[:, None] + 1 + np.arange(self.seq_len + 1)", [TL]),
    ("prompt_mask_one_too_many", "tinygpt/data.py", "y[:, :self.prompt_len - 1] = -1",
     "y[:, :self.prompt_len] = -1",
     [TRAIN + "test_task_batches_put_the_loss_on_the_answer_only", DIST_TASK]),
    ("accumulation_not_divided", "train.py", "loss = run.train_model(x, y)[1] / run.micro_steps",
     "loss = run.train_model(x, y)[1]", [TL]),
    ("accumulation_divided_by_global_steps", "train.py",
     "loss = run.train_model(x, y)[1] / run.micro_steps",
     "loss = run.train_model(x, y)[1] / cfg.gradient_accumulation_steps", [TORCHRUN]),
    ("weight_decay_lost", "tinygpt/optim.py", '"weight_decay": weight_decay}',
     '"weight_decay": 0.0}', [TL]),
    ("weight_decay_on_gains_too", "tinygpt/optim.py", 'p.dim() < 2], "weight_decay": 0.0}',
     'p.dim() < 2], "weight_decay": weight_decay}', [TL]),
    ("betas_ignored", "tinygpt/optim.py", "betas=betas, fused=fused",
     "betas=(0.9, 0.95), fused=fused", [TL]),
    ("clip_ignores_its_option", "tinygpt/optim.py", "clip_grads_with_norm_(parameters, grad_clip,",
     "clip_grads_with_norm_(parameters, 1.0,", [TL]),
    ("zero_grad_missing", "tinygpt/optim.py", "optimizer.zero_grad(set_to_none=not keep_grads)",
     "pass", [TL]),
    ("micro_batch_not_advanced", "train.py", 'x, y = run.batches.batch("train", picks[micro + 1])',
     "pass", [TL]),
    ("logged_loss_last_micro_step", "train.py", "step_loss += loss.detach()",
     "step_loss = loss.detach()", [TL]),
    ("same_batches_every_step", "train.py", "batch_rng(cfg.seed, data.TRAIN_STREAM, run.step)",
     "batch_rng(cfg.seed, data.TRAIN_STREAM, 0)", [TL]),
    ("warmup_off_by_one", "tinygpt/optim.py", "(step + 1) / (cfg.warmup_iters + 1)",
     "step / cfg.warmup_iters", [TL]),
    ("cosine_counts_from_step_0", "tinygpt/optim.py", "progress = (step - cfg.warmup_iters) /",
     "progress = step /", [TL]),
    ("new_settings_not_applied_on_resume", "tinygpt/checkpoint.py",
     'groups = [{**old, **new} for old, new in zip(saved["param_groups"], settings)]',
     'groups = saved["param_groups"]',
     [TRAIN + "test_a_new_learning_rate_given_on_resume_is_the_one_used"]),
    ("optimizer_state_not_restored", "tinygpt/checkpoint.py",
     "        load_optimizer_state(optimizer, saved)\n", "        pass\n", [RESUME]),
    ("scaler_state_not_restored", "tinygpt/checkpoint.py",
     'scaler.load_state_dict(checkpoint["scaler"])', "pass", [TL]),
    ("rng_not_restored", "tinygpt/checkpoint.py", 'restore_rng_states(checkpoint["rng"])', "pass",
     [RESUME]),
    ("resume_one_step_ahead", "train.py", PROGRESS,
     '{**{k: saved.get(k, progress[k]) for k in progress}, "step": saved["step"] + 1}',
     [RESUME]),
    ("never_resumes", "tinygpt/checkpoint.py", "        return ckpt\n", "        return None\n",
     [TRAIN + "test_rerunning_a_command_resumes_and_never_starts_over_on_a_trained_model"]),
    ("every_eval_improves", "train.py", 'improved = losses["val"] < run.best_val_loss',
     "improved = True", [TL]),
    ("best_val_is_the_last_val", "train.py",
     'run.best_val_loss = min(run.best_val_loss, losses["val"])',
     'run.best_val_loss = losses["val"]', [TL]),
    ("best_pt_never_written", "tinygpt/checkpoint.py", "    if is_best:\n", "    if False:\n",
     [TL]),
    ("best_step_saved_as_step", "tinygpt/checkpoint.py", '"best_step": best_step,',
     '"best_step": step,', [TL]),
    ("eval_splits_swapped", "tinygpt/data.py", 'enumerate(("train", "val"))',
     'enumerate(("val", "train"))', [TL]),
    ("eval_leaves_train_mode_off", "tinygpt/data.py", "    model.train()\n", "    pass\n",
     [RESUME]),
    ("final_loss_on_train_split", "tinygpt/data.py",
     '"val", batch_size, ctx, dist)\n        bpb = bits_per_byte(',
     '"train", batch_size, ctx, dist)\n        bpb = bits_per_byte(', [TL]),
    ("exact_match_first_letter_only", "tinygpt/data.py",
     "(out[:, prompt_len:] == chunk[:, prompt_len:]).all(dim=1)",
     "(out[:, prompt_len] == chunk[:, prompt_len])",
     [TRAIN + "test_exact_match_scorer_gives_one_for_an_oracle_and_less_for_broken_models"]),
    ("loss_not_averaged_over_ranks", "train.py", "/ dist.world_size).tolist()", ").tolist()",
     [TORCHRUN]),
    ("every_rank_the_same_rows", "tinygpt/data.py",
     "global_picks[:, rank * rows:(rank + 1) * rows]", "global_picks[:, :rows]", [TORCHRUN]),
    ("grad_sync_on_the_first_micro_step", "train.py",
     "sync_gradients(run.train_model, micro == run.micro_steps - 1)",
     "sync_gradients(run.train_model, micro == 0)", [TORCHRUN]),
    ("causal_mask_one_ahead", "model.py", "return distance >= 0", "return distance >= -1", [MODEL]),
    ("cache_advances_one_per_call", "model.py", "cache.pos += T", "cache.pos += 1", [MODEL]),
    ("learned_positions_ignore_the_cache", "model.py", "self.wpe(start + torch.arange(",
     "self.wpe(torch.arange(", [MODEL]),
    ("lone_query_unscaled", "model.py", "scores = (q * self.scale) @ k", "scores = q @ k", [MODEL]),
    ("head_not_tied", "model.py", "self.lm_head.weight = self.wte.weight", "pass", [MODEL]),
    ("residual_init_not_scaled", "model.py", "std=0.02 / math.sqrt(2 * config.n_layer)",
     "std=0.02", [BY_HAND]),
    ("sinusoidal_unscaled", "model.py", "x = x + 0.02 * math.sqrt(2) * table", "x = x + table",
     [BY_HAND]),
    ("top_k_one_too_many", "model.py", "torch.topk(logits, top_k,", "torch.topk(logits, top_k + 1,",
     [SAMPLING]),
    ("top_p_drops_the_token_reaching_p", "model.py", "probs.cumsum(dim=-1) - probs >= top_p",
     "probs.cumsum(dim=-1) >= top_p", [SAMPLING]),
    ("window_restarts_one_longer", "model.py", "keep = block if cache is None else block // 2",
     "keep = block if cache is None else block // 2 + 1", [SAMPLING]),
    ("sink_eviction_one_too_many", "model.py", "drop = self.pos + n - self.max_len",
     "drop = self.pos + n - self.max_len + 1", [SAMPLING, MODEL]),
    ("sample_seed_ignored", "sample.py", "manual_seed(cfg.seed)", "manual_seed(1337)", [SAMPLE]),
    ("chat_history_order_reversed", "tinygpt/chat.py", "tail = turn + tail", "tail = tail + turn",
     ["tests/test_chat.py::"
      "test_the_history_keeps_the_system_message_and_the_most_recent_whole_turns_that_fit"]),
    ("evaluate_ignores_block_size", "tools/evaluate.py",
     "cfg.block_size or model.config.block_size", "model.config.block_size",
     ["tests/test_evaluate.py"]),
    ("evaluate_stream_ignores_sinks", "tools/evaluate.py", "(True, sink_tokens)", "(True, 0)",
     ["tests/test_evaluate.py"]),
    ("qa_loss_on_the_last_question_token", "tinygpt/chat.py", "y[: len(prompt) - 1] = -1",
     "y[: len(prompt) - 2] = -1", ["tests/test_milestones.py"]),
    ("grad_scaler_never_updated", "tinygpt/optim.py", "scaler.update()", "pass", [TL]),
    ("tools_load_ckpt_pt_by_default", "tinygpt/checkpoint.py",
     'return best if best.is_file() else out_dir / "ckpt.pt"', 'return out_dir / "ckpt.pt"', [TL]),
    ("full_split_windows_overlap", "tinygpt/data.py",
     "np.arange(0, n - self.seq_len, self.seq_len)",
     "np.arange(0, n - self.seq_len, self.seq_len // 2)", [TL]),
    ("sample_ignores_top_p", "sample.py", "cfg.top_k, cfg.top_p,", "cfg.top_k, None,",
     [SAMPLING]),
]


def problems() -> list:
    """What keeps a mutation from running as written: an anchor not found exactly once in its
    file, or a test file or test function that no longer exists."""
    found = []
    for name, file, text, _, tests in MUTATIONS:
        count = (REPO / file).read_text().count(text) if (REPO / file).is_file() else 0
        if count != 1:
            found.append(f"{name}: its anchor occurs {count} times in {file}, not once")
        for test in tests:
            test_file, _, function = test.partition("::")
            code = (REPO / test_file).read_text() if (REPO / test_file).is_file() else ""
            if not code or function and f"def {function}(" not in code:
                found.append(f"{name}: no test {test}")
    return found


def apply(name, pytest_options=()):
    [(_, file, text, replacement, tests)] = [m for m in MUTATIONS if m[0] == name]
    path = REPO / file
    original = path.read_text()
    if original.count(text) != 1:
        raise SystemExit(f"{name}: the text to replace occurs {original.count(text)} times in "
                         f"{file}, not once; python tests/mutation_check.py --check lists them all")
    try:
        path.write_text(original.replace(text, replacement))
        env = {**os.environ, "WANDB_MODE": "offline"}
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                   *pytest_options, *tests]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    finally:
        path.write_text(original)
    failed = re.findall(r"^FAILED (.+?)(?: - .*)?$", result.stdout, re.M)
    # Under pytest-xdist, -x ends the run as interrupted (exit 2) after the first failure.
    if result.returncode in (1, 2) and failed:
        return f"CAUGHT  {name:40s} {file}: {', '.join(failed)}"
    if result.returncode == 0:
        return f"MISSED  {name:40s} {file}: {' '.join(tests)} passed"
    return f"ERROR   {name:40s} {file}: pytest exit {result.returncode}\n{result.stdout[-1500:]}"


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv[0] == "--list":
        for name, file, text, replacement, tests in MUTATIONS:
            print(f"{name:40s} {file}: {text!r} -> {replacement!r}")
        return 0
    if argv[0] == "--check":
        found = problems()
        print("\n".join(found) or f"all {len(MUTATIONS)} anchors found once, every test exists")
        return 1 if found else 0
    split = argv.index("--") if "--" in argv else len(argv)
    argv, pytest_options = argv[:split], argv[split + 1:]
    names = [m[0] for m in MUTATIONS] if argv[0] == "--all" else argv
    for name in names:
        print(apply(name, pytest_options), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
