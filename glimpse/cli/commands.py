"""The `glimpse` command handlers: each takes the parsed arguments, imports what it needs when it runs (so
`glimpse --help` stays fast) and raises GlimpseError for a user's mistake, which `main` prints as one line."""

from __future__ import annotations

import json
from pathlib import Path

from glimpse.errors import GlimpseError


def cmd_data_shapes(a) -> None:
    from glimpse.data.world import make_world

    make_world(a.out, seed=a.seed, n_train=a.train, n_val=a.val, n_test=a.test, image_size=a.image_size,
               shards=a.shards, progress=not a.quiet)
    print(f"wrote the shapes world to {a.out}")


def cmd_data_shapes_video(a) -> None:
    from glimpse.data.world import make_video_world

    make_video_world(a.out, seed=a.seed, n_train=a.train, n_val=a.val, n_test=a.test, frames=a.frames,
                     image_size=a.image_size, shards=a.shards, progress=not a.quiet)
    print(f"wrote the moving-shapes world to {a.out}")


def cmd_data_shapes_shop(a) -> None:
    from glimpse.data.shapes_shop import generate_shapes_shop

    info = generate_shapes_shop(a.out, seed=a.seed, n_users=a.users, n_items=a.items, image_size=a.image_size,
                                progress=not a.quiet)
    print(f"wrote the shapes shop to {a.out}: {info['users']} users, {info['items']} items "
          f"({info['cold_items']} cold), {info['interactions']} purchases")


def cmd_recommend(a) -> None:
    from glimpse.api import load

    pipe = load(a.run)
    if not hasattr(pipe, "recommend_users"):
        raise GlimpseError(f"{a.run} is not a recommender run")
    if (a.user is None) == (a.history is None):
        raise GlimpseError("give one of --user U or --history ITEM,ITEM,...")
    if a.k < 1:
        raise GlimpseError(f"--k must be at least 1, not {a.k}")
    if a.user is not None:
        recs = pipe.recommend_users([a.user], a.k, search=a.search)[0]
    else:
        items = [x.strip() for x in a.history.split(",") if x.strip()]
        if not items:
            raise GlimpseError("--history: no item ids (give them comma-separated)")
        pictures = (".png", ".jpg", ".jpeg", ".webp", ".gif")  # a picture file is a new item; anything else an id
        recs = pipe.recommend([[{"image": x} if x.lower().endswith(pictures) and Path(x).is_file() else x
                                for x in items]], a.k, search=a.search)[0]
    if a.json:
        print(json.dumps(recs, indent=2))
        return
    for rank, r in enumerate(recs, start=1):
        print(f"{rank:3d}  {r['item']:<14} {r['score']:8.3f}  {r['title']}{'  (cold)' if r['cold'] else ''}")


def cmd_train(a) -> None:
    from glimpse.config import load_recipe
    from glimpse.distributed import shutdown_distributed
    from glimpse.train.trainer import train

    recipe = load_recipe(a.recipe, a.set)
    out = a.out or str(Path("runs") / recipe.name)
    results = train(recipe, out, resume=a.resume, progress=not a.quiet)
    shutdown_distributed()  # under torchrun: leave the group cleanly (a no-op in one process)
    if results:
        print_table(results)
        print(f"run saved in {out}")


def cmd_eval(a) -> None:
    from glimpse.api import load_run
    from glimpse.config import validate_recipe
    from glimpse.train.trainer import data_root

    task, model = load_run(a.run, a.set)
    validate_recipe(task.recipe)
    task.root = data_root(task.recipe, not a.quiet)  # the run folder holds no data: find the recipe's
    if a.explain:
        results = _evaluate_explanations(task, model, a)
    else:
        splits = a.split or task.recipe.eval.splits
        results = task.evaluate(model, splits) if splits else {}
    if not results:
        raise GlimpseError("nothing to evaluate: no splits given (--split S, or eval.splits in the recipe)")
    print_table(results)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")


def _evaluate_explanations(task, model, a) -> dict:
    """`glimpse eval RUN --explain`: every method against the shapes world's boxes (glimpse.explain.evaluate)."""
    from tqdm import tqdm

    from glimpse.explain import METHODS
    from glimpse.explain.evaluate import evaluate_explanations, explain_cases
    pipe = _explainable(task.pipeline(model), a.run)
    methods = [m.strip() for m in a.methods.split(",")] if a.methods else list(METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise GlimpseError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if a.n < 1:
        raise GlimpseError(f"--n must be at least 1, not {a.n}")
    split = (a.split or ["test"])[0]
    cases = explain_cases(task.root, split, n=a.n, asks=pipe.explains)
    with tqdm(total=len(cases), desc=f"explain {split}", unit="case", disable=a.quiet) as bar:
        return evaluate_explanations(pipe, cases, methods, deletion_n=min(a.n, 100), sanity_n=min(a.n, 100),
                                     progress=bar)


def _explainable(pipe, run):
    from glimpse.families.base import can_explain

    if not can_explain(pipe):
        raise GlimpseError(f"{run}: this kind of model has no explanations (dual encoders, fusion encoders and "
                           "vision-language models of images do)")
    return pipe


def cmd_explain(a) -> None:
    """Where a run looked: IMAGE with the heatmap of one method over it, and the text's tokens shaded."""
    from glimpse.api import load
    from glimpse.data.images import load_image
    from glimpse.explain import METHODS, explain
    from glimpse.explain.render import save

    if a.method not in METHODS:
        raise GlimpseError(f"--method: unknown {a.method!r}; choose from {', '.join(METHODS)}")
    pipe = _explainable(load(a.run), a.run)
    if pipe.explains == "texts":
        if a.text is None:
            raise GlimpseError(f"{a.run} matches images with texts: give --text \"the red circle\"")
        explainer = pipe.explainer(a.image, a.text)
    else:
        if a.question is None:
            raise GlimpseError(f"{a.run} answers questions: give --question \"what colour is the circle?\"")
        explainer = pipe.explainer(a.image, question=a.question, answer=a.answer)
    e = explain(explainer, a.method)
    out = save(load_image(a.image), e, a.out)
    if a.json:
        print(json.dumps(e.to_dict(), indent=2))
        return
    print(f"{e.method}: {e.target}  score {e.score:.4f}  ({1000 * e.seconds:.0f} ms)")
    if e.tokens and e.token_scores:
        print("tokens: " + "  ".join(f"{t}:{s:.2f}" for t, s in zip(e.tokens, e.token_scores)))
    print(f"heatmap written to {out}")


def cmd_index_build(a) -> None:
    from glimpse.index import build_index

    n, failures = build_index(a.run, a.images, a.out, progress=not a.quiet)
    skipped = sum(failures.values())
    print(f"indexed {n} images into {a.out}" + (f"; skipped {skipped} bad files (" +
          ", ".join(f"{r} {c}" for r, c in sorted(failures.items())) + ")" if skipped else ""))


def cmd_search(a) -> None:
    from glimpse.index import ImageIndex

    if (a.text is None) == (a.image is None):
        raise GlimpseError("give a text query or --image QUERY, not both")
    index = ImageIndex(a.index, a.run)
    hits = index.search_text(a.text, a.k) if a.text is not None else index.search_image(a.image, a.k)
    for rank, (path, score) in enumerate(hits, 1):
        print(f"{rank:3d}  {score:.4f}  {path}")


def _chat_model(run):
    from glimpse.api import load
    from glimpse.families.base import can_chat

    pipe = load(run)
    if not can_chat(pipe):
        raise GlimpseError(f"{run} does not talk about images (caption, ask and chat need a model that does, "
                           "such as a vision-language run or a LLaVA folder)")
    return pipe


def _generation(a) -> dict:
    opts = {"max_new_tokens": a.max_new_tokens}
    if a.temperature > 0:
        opts.update(do_sample=True, temperature=a.temperature, top_p=a.top_p, seed=a.seed)
    return opts


def cmd_caption(a) -> None:
    pipe = _chat_model(a.run)
    for path, text in zip(a.images, pipe.caption(a.images, **_generation(a))):
        print(f"{path}: {text}" if len(a.images) > 1 else text)


def cmd_ask(a) -> None:
    from glimpse.data.messages import user_message

    pipe = _chat_model(a.run)
    for piece in pipe.chat([user_message(a.images, a.question)], stream=True, **_generation(a)):
        print(piece, end="", flush=True)
    print()


def cmd_chat(a) -> None:
    """A conversation on the terminal: `/image PATH` attaches an image to the next message,
    `/reset` forgets the conversation, `/quit` (or end of input) leaves."""
    from glimpse.data.messages import user_message

    pipe = _chat_model(a.run)
    messages, pending = [], list(a.image or [])
    print("glimpse chat: /image PATH attaches an image, /reset starts over, /quit leaves")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            messages, pending = [], []
            print("(conversation cleared)")
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            if not Path(path).is_file():
                print(f"no such image: {path}")
            else:
                pending.append(path)
                print(f"(attached {path})")
            continue
        user = user_message(pending, line)
        print("assistant> ", end="", flush=True)
        reply = ""
        try:
            for piece in pipe.chat(messages + [user], stream=True, **_generation(a)):
                reply += piece
                print(piece, end="", flush=True)
        except GlimpseError as e:  # a bad image or an over-long conversation: say so, keep the chat
            print(f"\nerror: {e}")
            continue
        print()
        messages += [user, {"role": "assistant", "content": reply}]
        pending = []


def cmd_generate(a) -> None:
    """Images from a text prompt with a text-to-image run: PNGs in --out, one line per file."""
    from glimpse.api import load

    pipe = load(a.run, device=a.device)
    if not hasattr(pipe, "generate_images"):
        raise GlimpseError(f"{a.run} does not generate images (it is not a text_to_image run)")
    if not 1 <= a.n <= 64:
        raise GlimpseError(f"--n must be between 1 and 64, not {a.n}")
    images = pipe.generate_images(a.prompt, n=a.n, seed=a.seed, guidance=a.guidance, steps=a.steps,
                                  candidates=a.candidates, temperature=a.temperature,
                                  phrase_guidance=a.phrase_guidance)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        path = out / f"{a.seed:04d}-{i:02d}.png"
        image.save(path)
        print(path)


def cmd_demo(a) -> None:
    from glimpse.demo import run_demo
    from glimpse.demo.captioner import run_captioner_demo
    from glimpse.demo.recsys import run_recsys_demo
    from glimpse.demo.t2i import run_t2i_demo
    from glimpse.demo.video import run_video_demo

    if a.which == "captioner":
        run_captioner_demo(a.out or "runs/demo-captioner", progress=not a.quiet, overrides=a.set)
    elif a.which == "t2i":
        run_t2i_demo(a.out or "runs/demo-t2i", progress=not a.quiet, overrides=a.set)
    elif a.which == "video":
        run_video_demo(a.out or "runs/demo-video", progress=not a.quiet, overrides=a.set)
    elif a.which == "recsys":
        run_recsys_demo(a.out or "runs/demo-recsys", progress=not a.quiet, overrides=a.set)
    else:
        run_demo(a.out or "runs/demo", progress=not a.quiet, overrides=a.set)


def cmd_serve(a) -> None:
    from glimpse.serve import ServerLimits, serve

    limits = ServerLimits(max_batch=a.max_batch, max_pending=a.max_pending)
    hosts = [h for item in a.allow_remote_images for h in item.split(",")]
    serve(a.run, a.host, a.port, device=a.device, model_name=a.model_name, limits=limits,
          allow_remote_images=hosts or None, api_key=a.api_key, no_api_key=a.no_api_key)


def cmd_convert(a) -> None:
    from glimpse.api import export

    if a.to == "safetensors":  # a sharded (FSDP) checkpoint as one file, where glimpse.load looks
        if a.merge_lora or a.dtype != "fp32":
            raise GlimpseError("convert --to safetensors writes the checkpoint's weights as they are: "
                               "--merge-lora and --dtype are for --to hf")
        from glimpse.train.checkpoint import write_consolidated

        print(f"wrote the whole model to {write_consolidated(a.src, a.dst)}")
        return
    if a.dst is None:
        raise GlimpseError("convert --to hf: give the folder to write (glimpse convert RUN DST --to hf)")
    out = export(a.src, a.dst, a.dtype, merge_lora=a.merge_lora)
    print(f"wrote a Hugging Face model folder to {out}"
          + (f" (and its LoRA adapters in PEFT's format to {out / 'adapter'})" if (out / "adapter").is_dir() else ""))


def print_table(results: dict[str, float]) -> None:
    width = max(len(k) for k in results)
    for k, v in results.items():
        print(f"  {k:<{width}}  {v if isinstance(v, int) else format(v, '.4f')}")
