"""The reference's serving stack, written as its api_serving/app.py does it, for
scripts/bench-serve.sh and scripts/bench-kafka.sh: FastAPI + uvicorn + PyTorch MobileNetV2, the
model loaded once at start (in eval mode, as the reference's training script logs it), `POST
/predict` with `{"image_path": "..."}` relative to an image root answering `{"target": int}`
through a response model. Each request, as app.py: puts the request in a one-row pandas
DataFrame, builds the transforms, opens the image with PIL, resizes it to SIZE×SIZE (the
reference: 256), normalises with mean and std 0.5 and runs one image through the network with
autograd on (app.py has no `torch.no_grad()`). `--no-grad` runs the network under
`torch.no_grad()` and skips the DataFrame: the reference tuned, for a second comparison. The
same weights as the bccp run it is compared with: the MobileNetV2 backbone of the assets (old
torchvision layout, mapped by scripts/mobilenet_v2_reference.py) and the bccp run's head
(model.safetensors: head.weight, head.bias) as the classifier.

Usage: python bench_serve_reference.py --root DIR --weights W.safetensors --head RUN/model.safetensors
       --size 256 --port 8001 [--no-grad]
"""

import argparse
import os
import sys

import pandas as pd
import torch
import uvicorn
from fastapi import FastAPI
from PIL import Image
from pydantic import BaseModel
from safetensors.torch import load_file
from torchvision import transforms

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mobilenet_v2_reference import load_features  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--root", required=True)
parser.add_argument("--weights", required=True)
parser.add_argument("--head", required=True)
parser.add_argument("--size", type=int, default=256)
parser.add_argument("--port", type=int, default=8001)
parser.add_argument("--no-grad", action="store_true",
                    help="tuned: the network under torch.no_grad(), no DataFrame per request")
args = parser.parse_args()

model, _ = load_features(args.weights)
head = load_file(args.head)
classifier = torch.nn.Linear(head["head.weight"].shape[1], head["head.weight"].shape[0])
classifier.load_state_dict({"weight": head["head.weight"], "bias": head["head.bias"]})
model.classifier = torch.nn.Sequential(torch.nn.Dropout(0.2), classifier)
model.eval()

def make_transform():
    return transforms.Compose(
        [
            transforms.Resize((args.size, args.size)),
            transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ]
    )


app = FastAPI()


class PredictIn(BaseModel):
    image_path: str


class PredictOut(BaseModel):
    target: int


if args.no_grad:
    transform = make_transform()

    @app.post("/predict", response_model=PredictOut)
    def predict(request: PredictIn) -> PredictOut:
        image = Image.open(os.path.join(args.root, request.image_path)).convert("RGB")
        x = transform(image).unsqueeze(0)
        with torch.no_grad():
            logits = model(x)
        return PredictOut(target=int(logits.argmax(dim=1).item()))

else:

    @app.post("/predict", response_model=PredictOut)
    def predict(request: PredictIn) -> PredictOut:
        df = pd.DataFrame([request.model_dump()])
        transform = make_transform()
        image = Image.open(os.path.join(args.root, df["image_path"][0])).convert("RGB")
        x = torch.unsqueeze(transform(image), dim=0)
        return PredictOut(target=model(x).max(1, keepdim=True)[1].item())


@app.get("/healthz")
def healthz():
    return {"status": "ok"}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
