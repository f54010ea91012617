"""Start the Gradio app from Python, call it once through its API, keep serving.

    python examples/serve_app.py --base CompVis/stable-diffusion-v1-4 --adapters ./my-subjects

`./my-subjects` holds one sub-folder per trained subject (what `lora-dreambooth train --output` writes). The same
as `lora-dreambooth serve --base ... --adapters ...`, plus a first image made through `gradio_client`, which is
how other programs can use a running app. `--once` stops after that image (handy for a smoke test).
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from lora_dreambooth.serve.app import serve  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True)
    parser.add_argument("--adapters", required=True, help="library folder")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--size", type=int, default=None, help="image side for the first image [native]")
    parser.add_argument("--once", action="store_true", help="stop after the first image")
    args = parser.parse_args()

    app = serve(args.base, args.adapters, port=args.port, block=False)  # 127.0.0.1 only, no share link
    print(f"app running at {app.url} with subjects: {', '.join(app.resident.names) or 'none yet'}")

    from gradio_client import Client

    client = Client(app.url, verbose=False, analytics_enabled=False)
    subject = app.resident.names[0] if app.resident.names else "(base model)"
    prompt = app.library.get(subject).instance_prompt if subject in app.library else "a photo"
    size = args.size or app.resident.native_size()
    images, seed, status = client.predict(
        subject=subject, prompt=prompt, negative_prompt="", strength=1.0, mix_subject="(base model)",
        mix_strength=0.5, steps=25, guidance=7.5, seed=0, randomize_seed=False, num_images=1, width=size,
        height=size, api_name="/generate")
    print(f"first image ({subject!r}, {prompt!r}): {images[0]['image']}\n{status}")
    if args.once:
        app.close()
        return
    print("serving; Ctrl+C to stop")
    try:
        app.demo.block_thread()
    finally:
        app.close()


if __name__ == "__main__":
    main()
