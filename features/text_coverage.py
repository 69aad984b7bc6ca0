"""How much of each text field the text encoder can read: the share of its tokens that are [UNK].

A tokenizer that lacks a script (all-MiniLM-L6-v2's English vocabulary on Chinese titles) maps most
characters to its unk token, and the encoder then embeds noise without complaint. Extract counts, per
text field, the unk tokens among the real ones (special tokens aside), one record per written batch
in CACHE/<split>.tokens.jsonl (so a resumed run still counts every row once), puts the totals in
<split>.report.json and warns on stderr above UNK_WARN_SHARE.
"""
import json
import sys

from core import schema

UNK_WARN_SHARE = 0.05                 # warn when more than 5% of a field's tokens are unknown


def field_token_counts(tokenizer, field_ids):
    """[[unk, real tokens] per field]; field_ids: token ids per field (None for an empty field)."""
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    counts = []
    for ids in field_ids:
        real = [i for i in ids or () if i not in special]
        counts.append([sum(i == tokenizer.unk_token_id for i in real), len(real)])
    return counts


def batch_record(start, batch):
    """One JSON line: the batch's first row and its summed [unk, real tokens] per field."""
    totals = [[sum(it["unk_counts"][f][k] for it in batch) for k in (0, 1)]
              for f in range(len(schema.TEXT_FIELDS))]
    return json.dumps({"start": int(start), "counts": totals}) + "\n"


def unk_summary(path):
    """{field: {unk, tokens, unk_share}} summed over the records in `path` (a batch counted once)."""
    per_batch = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            per_batch[record["start"]] = record["counts"]      # a redone batch replaces its first try
    summary = {}
    for f, field in enumerate(schema.TEXT_FIELDS):
        unk = sum(counts[f][0] for counts in per_batch.values())
        tokens = sum(counts[f][1] for counts in per_batch.values())
        summary[field] = {"unk": unk, "tokens": tokens, "unk_share": round(unk / tokens, 4) if tokens else None}
    return summary


def warn_unreadable(split, summary, text_encoder_spec, stream=None):
    """Print a warning per field whose unk share is above UNK_WARN_SHARE; returns the fields warned about."""
    stream = stream or sys.stderr
    warned = [field for field, s in summary.items() if s["unk_share"] is not None and s["unk_share"] > UNK_WARN_SHARE]
    for field in warned:
        print(f"WARNING: {split}: {summary[field]['unk_share']:.1%} of the {field} tokens are unknown to the "
              f"text encoder {text_encoder_spec} ([UNK]), so their embeddings carry little of the text; "
              f"use a text encoder for this language, --text-encoder bert:<dir> (e.g. a Chinese BERT)",
              file=stream, flush=True)
    return warned
