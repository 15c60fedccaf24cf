"""The `glimpse` command line.  Every user error is one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import os
import sys
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
                     image_size=a.image_size, progress=not a.quiet)
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
    from glimpse.train.trainer import train

    recipe = load_recipe(a.recipe, a.set)
    out = a.out or str(Path("runs") / recipe.name)
    results = train(recipe, out, resume=a.resume, progress=not a.quiet)
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


def _generation_args(p) -> None:
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sample")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def cmd_generate(a) -> None:
    """Images from a text prompt with a text-to-image run: PNGs in --out, one line per file."""
    from glimpse.api import load

    pipe = load(a.run, device=a.device)
    if not hasattr(pipe, "generate_images"):
        raise GlimpseError(f"{a.run} does not generate images (it is not a text_to_image run)")
    if not 1 <= a.n <= 64:
        raise GlimpseError(f"--n must be between 1 and 64, not {a.n}")
    images = pipe.generate_images(a.prompt, n=a.n, seed=a.seed, guidance=a.guidance, steps=a.steps,
                                  candidates=a.candidates, temperature=a.temperature)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        path = out / f"{a.seed:04d}-{i:02d}.png"
        image.save(path)
        print(path)


def cmd_demo(a) -> None:
    from glimpse.demo import run_captioner_demo, run_demo, run_t2i_demo
    from glimpse.demo.recsys import run_recsys_demo
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


def _at_least_one(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glimpse", description="Build, train, evaluate and serve vision-language models.")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="write data sets").add_subparsers(dest="what", required=True)
    s = data.add_parser("shapes", help="write the synthetic shapes world in real formats")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--train", type=int, default=20000)
    s.add_argument("--val", type=int, default=500)
    s.add_argument("--test", type=int, default=1000)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--shards", action="store_true", help="also write WebDataset tar shards")
    s.set_defaults(func=cmd_data_shapes)
    s = data.add_parser("shapes-video", help="write the moving-shapes world: MP4 clips with captions, questions, "
                        "conversations")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--train", type=int, default=4000)
    s.add_argument("--val", type=int, default=200)
    s.add_argument("--test", type=int, default=500, help="clips in test and in test_novel")
    s.add_argument("--frames", type=int, default=8, help="frames a clip, 8 to 16")
    s.add_argument("--image-size", type=int, default=64)
    s.set_defaults(func=cmd_data_shapes_video)
    s = data.add_parser("shapes-shop", help="write the shapes shop: items with pictures and titles, users' purchase "
                        "histories (RecBole and MMRec files)")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--users", type=int, default=5000)
    s.add_argument("--items", type=int, default=2000)
    s.add_argument("--image-size", type=int, default=64)
    s.set_defaults(func=cmd_data_shapes_shop)

    t = sub.add_parser("train", help="train a recipe")
    t.add_argument("recipe", help="a recipe YAML file or the name of a shipped one")
    t.add_argument("--out", help="the run folder (default runs/RECIPE)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a run")
    e.add_argument("run")
    e.add_argument("--split", action="append", help="split to evaluate (repeatable; default: the recipe's)")
    e.add_argument("--json", help="also write the figures to this JSON file")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    e.add_argument("--explain", action="store_true",
                   help="score the explanation methods against the shapes world's object boxes (--split, default test)")
    e.add_argument("--n", type=int, default=200, help="--explain: scenes to explain (default 200)")
    e.add_argument("--methods", help="--explain: comma-separated methods (default all)")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("explain", help="where a run looked: a heatmap over the image, the text's tokens shaded")
    x.add_argument("run")
    x.add_argument("image")
    x.add_argument("--text", help="the text to match (dual encoders, fusion matching)")
    x.add_argument("--question", help="the question to answer (vision-language runs, fusion VQA)")
    x.add_argument("--answer", help="explain this answer instead of the one the model gives")
    x.add_argument("--method", default="chefer", help="raw, rollout, gradcam, chefer (default) or occlusion")
    x.add_argument("--out", default="heat.png", help="the picture to write (default heat.png)")
    x.add_argument("--json", action="store_true", help="print the explanation (grid, tokens) as JSON")
    x.set_defaults(func=cmd_explain)

    idx = sub.add_parser("index", help="image indexes").add_subparsers(dest="what", required=True)
    b = idx.add_parser("build", help="embed a folder of images into a searchable index")
    b.add_argument("run")
    b.add_argument("images")
    b.add_argument("--out", required=True)
    b.set_defaults(func=cmd_index_build)

    q = sub.add_parser("search", help="search an image index by text or by image")
    q.add_argument("index")
    q.add_argument("text", nargs="?")
    q.add_argument("--image", help="search by this image instead of text")
    q.add_argument("--k", type=int, default=5)
    q.add_argument("--run", help="embed queries with this run instead of the one that built the index")
    q.set_defaults(func=cmd_search)

    c = sub.add_parser("caption", help="caption images with a vision-language run")
    c.add_argument("run")
    c.add_argument("images", nargs="+")
    _generation_args(c)
    c.set_defaults(func=cmd_caption)

    k = sub.add_parser("ask", help="ask a question about an image (the answer streams)")
    k.add_argument("run")
    k.add_argument("images", nargs="+", metavar="IMAGE")
    k.add_argument("question")
    _generation_args(k)
    k.set_defaults(func=cmd_ask)

    h = sub.add_parser("chat", help="talk with a vision-language run on the terminal")
    h.add_argument("run")
    h.add_argument("--image", action="append", help="attach this image to the first message")
    _generation_args(h)
    h.set_defaults(func=cmd_chat)

    v = sub.add_parser("serve", help="serve a run over an OpenAI-compatible HTTP API with a web chat page")
    v.add_argument("run")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--device", default="cpu")
    v.add_argument("--model-name", help="the model id clients send (default: the run folder's name)")
    v.add_argument("--max-batch", type=_at_least_one, default=8, help="rows decoded together")
    v.add_argument("--max-pending", type=_at_least_one, default=32, help="requests in flight before a 429")
    v.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every /v1 request "
                   "(default: $GLIMPSE_API_KEY)")
    v.add_argument("--no-api-key", action="store_true",
                   help="serve a non-loopback address without an API key (refused otherwise)")
    v.add_argument("--allow-remote-images", action="append", default=[], metavar="HOST[,HOST]",
                   help="fetch http(s) image URLs from these hosts (public addresses only); off by default")
    v.set_defaults(func=cmd_serve)

    r = sub.add_parser("recommend", help="recommend items with a recommender run, for a known user or a history")
    r.add_argument("run")
    r.add_argument("--user", help="a user id (or index) of the run's data: after everything they bought")
    r.add_argument("--history", help="item ids (or item picture files, as new items), comma-separated, oldest first")
    r.add_argument("--k", type=int, default=10)
    r.add_argument("--search", choices=["exact", "faiss"], default="exact",
                   help="exact top-k over every item, or a FAISS inner-product index (needs faiss-cpu)")
    r.add_argument("--json", action="store_true", help="print the recommendations as JSON")
    r.set_defaults(func=cmd_recommend)

    g = sub.add_parser("generate", help="generate images from a text prompt with a text-to-image run")
    g.add_argument("run")
    g.add_argument("prompt")
    g.add_argument("--n", type=int, default=4, help="images to write (default 4)")
    g.add_argument("--out", default="generated", help="the folder the PNGs go to (default ./generated)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the run's)")
    g.add_argument("--steps", type=int, default=None, help="MaskGIT unmasking steps (default: the run's)")
    g.add_argument("--candidates", type=int, default=None,
                   help="samples per image, of which CLIP keeps the best (default: the run's)")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--device", default="cpu")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="the main job end to end on the shapes world")
    d.add_argument("which", nargs="?", choices=["all", "captioner", "t2i", "video", "recsys"], default="all",
                   help="all: the dual encoder and LLaVA (default); captioner: the encoder-decoder captioner; "
                        "t2i: text-to-image (tokenizer and MaskGIT prior); video: a video dual encoder and a "
                        "video LLaVA on the moving-shapes world; recsys: a two-tower recommender and BPR-MF on the shapes shop")
    d.add_argument("--out", default=None, help="runs/demo (captioner: runs/demo-captioner; t2i: runs/demo-t2i; "
                                               "video: runs/demo-video; recsys: runs/demo-recsys)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the demo recipe")
    d.set_defaults(func=cmd_demo)

    v = sub.add_parser("convert", help="export a glimpse run as a Hugging Face model folder, or a sharded "
                                       "(FSDP) checkpoint as one safetensors file")
    v.add_argument("src", help="a glimpse run (or one of its checkpoints)")
    v.add_argument("dst", nargs="?", default=None,
                   help="hf: the folder to write; safetensors: the file (default: model.safetensors in the "
                        "checkpoint's folder, where glimpse.load and the hf export read it)")
    v.add_argument("--to", choices=["hf", "safetensors"], required=True, help="the output format")
    v.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weights' dtype")
    v.add_argument("--merge-lora", action="store_true", help="a LoRA run: write the model with its adapters merged "
                   "(default: the base model, and the adapters in PEFT's format in DST/adapter)")
    v.set_defaults(func=cmd_convert)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except GlimpseError as e:
        print(f"glimpse: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("glimpse: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if os.environ.get("GLIMPSE_DEBUG"):
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"glimpse: internal error: {type(e).__name__}: {first} (set GLIMPSE_DEBUG=1 for the traceback)",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
