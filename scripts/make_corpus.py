#!/usr/bin/env python3
"""Generate fedrdma's demo corpus: template-written, fictional, license-clean text.

Three domains, each a style a small LM can visibly learn: clinical notes (hospital),
ledger entries and reconciliation notes (bank), IT helpdesk tickets (support). Every
sentence comes from templates in this file and a seeded `random.Random`, so the output is
byte-identical on every run and platform, contains no real person or record, and is
covered by the project's own license.

The demo silos are non-IID on purpose: each silo's file is mostly its own domain with a
small share of the others, and the files differ in size (so FedAvg weights differ). The
shared eval file holds fresh documents of all three domains in equal parts.

    python scripts/make_corpus.py            # writes fedrdma/fl/corpus/
    python scripts/make_corpus.py --out DIR  # elsewhere (the tests compare the two)
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "fedrdma" / "fl" / "corpus"
"""Where the package expects the corpus (fedrdma.fl.inputs.CORPUS_DIR)."""

SILOS: dict[str, tuple[int, dict[str, float]]] = {
    "hospital": (900, {"hospital": 0.85, "bank": 0.05, "support": 0.10}),
    "bank": (650, {"bank": 0.85, "hospital": 0.05, "support": 0.10}),
    "support": (450, {"support": 0.85, "hospital": 0.10, "bank": 0.05}),
}
"""Documents per silo and its domain mixture: sizes differ so FedAvg weights are unequal."""

EVAL_PER_DOMAIN = 80
"""Held-out documents per domain in the shared eval file: a few hundred blocks of 128 bytes."""

SEED = 20240611
"""Base seed; each file derives its own stream from it so files are independent."""

# -- vocabulary ---------------------------------------------------------------------------

FIRST = ["A.", "B.", "C.", "D.", "E.", "F.", "G.", "H.", "J.", "K.", "L.", "M.", "N.", "P.", "R.", "S.", "T.", "V."]
LAST = ["Moreau", "Okafor", "Lindqvist", "Tanaka", "Haddad", "Novak", "Silva", "Keller", "Ivanova", "Brennan",
        "Rossi", "Nakamura", "Oyelaran", "Duarte", "Fischer", "Kowalski", "Mensah", "Jansen", "Petrov", "Quinn"]

COMPLAINTS = [
    ("chest pain radiating to the left arm", "acute coronary syndrome", "troponin and serial ECGs"),
    ("shortness of breath on exertion", "decompensated heart failure", "BNP and a chest X-ray"),
    ("productive cough and fever", "community-acquired pneumonia", "chest X-ray and blood cultures"),
    ("right lower quadrant abdominal pain", "suspected appendicitis", "abdominal ultrasound and CBC"),
    ("sudden severe headache", "subarachnoid haemorrhage to be excluded", "non-contrast head CT"),
    ("painful swollen left calf", "deep vein thrombosis", "D-dimer and compression ultrasound"),
    ("burning on urination and flank pain", "pyelonephritis", "urinalysis and urine culture"),
    ("dizziness and palpitations", "atrial fibrillation with rapid ventricular response", "ECG and thyroid panel"),
    ("polyuria and polydipsia", "hyperglycaemia", "glucose, ketones and HbA1c"),
    ("fall with left hip pain", "femoral neck fracture", "pelvic and hip X-rays"),
    ("epigastric pain after meals", "peptic ulcer disease", "H. pylori testing and lipase"),
    ("new-onset confusion", "delirium of unclear cause", "electrolytes, glucose and a urine screen"),
]
HISTORY = ["hypertension", "type 2 diabetes", "asthma", "COPD", "chronic kidney disease stage 3",
           "hyperlipidaemia", "hypothyroidism", "atrial fibrillation on anticoagulation", "no significant history",
           "prior myocardial infarction", "osteoarthritis", "depression"]
MEDS = ["metformin 500 mg twice daily", "lisinopril 10 mg daily", "atorvastatin 40 mg nightly",
        "apixaban 5 mg twice daily", "levothyroxine 75 mcg daily", "salbutamol inhaler as needed",
        "amlodipine 5 mg daily", "omeprazole 20 mg daily", "sertraline 50 mg daily", "no regular medication"]
PLANS = [
    "Admit to the medical ward for monitoring.",
    "Start empirical antibiotics after cultures are drawn.",
    "Give IV fluids and recheck electrolytes in 6 hours.",
    "Consult cardiology today.",
    "Surgical review requested.",
    "Discharge with follow-up in primary care within 7 days.",
    "Keep nil by mouth pending imaging.",
    "Start low molecular weight heparin at treatment dose.",
    "Repeat observations every 4 hours and escalate if NEWS2 is 5 or more.",
    "Arrange physiotherapy assessment before discharge.",
]
WARDS = ["emergency department", "acute medical unit", "cardiology ward", "surgical assessment unit", "general medicine"]

MERCHANTS = ["Nordlicht GmbH", "Harbor Freight Lines", "Cedar & Stone Ltd", "Atlas Office Supply", "Bluewater Utilities",
             "Kestrel Logistics", "Maple Street Bakery", "Orion Software AB", "Sunfield Farms", "Vega Telecom",
             "Greyhaven Insurance", "Pinecrest Properties"]
TX_KINDS = [("DEBIT", "Wire transfer to supplier"), ("DEBIT", "Card payment at"), ("CREDIT", "Incoming payment from"),
            ("DEBIT", "Direct debit"), ("CREDIT", "Refund from"), ("DEBIT", "Standing order to")]
CURRENCIES = ["EUR", "USD", "GBP", "CHF", "SEK"]
AUDIT_FINDINGS = [
    "all entries matched the counterparty statements",
    "one entry was booked twice and has been reversed",
    "a card payment is missing its receipt; the holder was asked to upload it",
    "the closing balance differs from the statement by the amount of a pending transfer",
    "two direct debits were collected a day early; no action needed",
    "an incoming payment could not be matched to an open invoice and sits in suspense",
    "fees were charged at the old tariff; a correction was requested",
]

SYSTEMS = ["VPN client", "email", "shared drive", "laptop docking station", "printer on floor 3", "payroll portal",
           "video conferencing", "password reset page", "CRM", "build server", "Wi-Fi in meeting room B",
           "single sign-on"]
SYMPTOMS = ["disconnects every few minutes", "rejects valid credentials", "is very slow since this morning",
            "shows a certificate warning", "fails with error code 0x80070005", "does not start after the update",
            "times out when uploading large files", "prints blank pages", "freezes when sharing the screen",
            "sends duplicate notifications"]
STEPS = ["cleared the local cache", "restarted the service", "reinstalled the client", "renewed the certificate",
         "checked the DNS settings", "rolled back the last update", "reset the user's token",
         "replaced the network cable", "increased the upload timeout", "updated the driver"]
RESOLUTIONS = ["Resolved: the issue did not recur after the fix.",
               "Workaround applied; root cause tracked in the problem record.",
               "Escalated to the network team for a firmware upgrade.",
               "Closed: user confirmed everything works again.",
               "Pending: waiting for the vendor's patch.",
               "Resolved by configuration change; knowledge base article updated."]


def _name(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def _date(rng: random.Random) -> str:
    return f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def hospital_doc(rng: random.Random) -> str:
    complaint, impression, tests = rng.choice(COMPLAINTS)
    age = rng.randint(19, 93)
    sex = rng.choice(["female", "male"])
    hist = ", ".join(rng.sample(HISTORY, rng.randint(1, 3)))
    meds = "; ".join(rng.sample(MEDS, rng.randint(1, 3)))
    sys_bp, dia_bp = rng.randint(95, 185), rng.randint(55, 110)
    hr, rr, spo2 = rng.randint(52, 132), rng.randint(12, 30), rng.randint(86, 100)
    temp = rng.randint(360, 395) / 10
    plan = " ".join(rng.sample(PLANS, rng.randint(2, 3)))
    lines = [
        f"Clinical note, {rng.choice(WARDS)}, {_date(rng)}.",
        f"Patient: {age}-year-old {sex} presenting with {complaint} for {rng.randint(1, 72)} hours.",
        f"History: {hist}. Medication: {meds}.",
        f"Vitals: BP {sys_bp}/{dia_bp} mmHg, HR {hr} bpm, RR {rr}/min, SpO2 {spo2}% on room air, T {temp:.1f} C.",
        f"Assessment: {impression}. Investigations: {tests}.",
        f"Plan: {plan}",
        f"Signed: Dr {_name(rng)}.",
    ]
    return "\n".join(lines)


def bank_doc(rng: random.Random) -> str:
    account = f"{rng.randint(1000, 9999)}-{rng.randint(1000, 9999)}"
    currency = rng.choice(CURRENCIES)
    balance = rng.randint(2_000_00, 250_000_00)
    month = rng.randint(1, 12)
    lines = [f"Statement for account {account} ({currency}), 2024-{month:02d}. Opening balance {balance / 100:,.2f}."]
    for _ in range(rng.randint(3, 7)):
        kind, label = rng.choice(TX_KINDS)
        amount = rng.randint(5_00, 25_000_00)
        balance += amount if kind == "CREDIT" else -amount
        lines.append(
            f"2024-{month:02d}-{rng.randint(1, 28):02d} | {kind} | {amount / 100:,.2f} {currency} | "
            f"{label} {rng.choice(MERCHANTS)} | ref TX-{rng.randint(100000, 999999)} | balance {balance / 100:,.2f}"
        )
    lines.append(f"Reconciliation by {_name(rng)}: {rng.choice(AUDIT_FINDINGS)}.")
    if balance < 0:
        lines.append("The account is overdrawn; an overdraft notice was sent to the holder.")
    return "\n".join(lines)


def support_doc(rng: random.Random) -> str:
    system, symptom = rng.choice(SYSTEMS), rng.choice(SYMPTOMS)
    steps = ", then ".join(rng.sample(STEPS, rng.randint(1, 3)))
    lines = [
        f"Ticket #{rng.randint(10000, 99999)} (priority: {rng.choice(['low', 'medium', 'high', 'urgent'])}), opened {_date(rng)}.",
        f"Reporter: {_name(rng)}, {rng.choice(['finance', 'research', 'sales', 'operations', 'legal', 'HR'])}.",
        f"Summary: the {system} {symptom}.",
        f"Affected users: {rng.choice(['one user', 'a team of 5', 'the whole floor', 'all remote staff'])}.",
        f"Steps taken: the technician {steps}.",
        rng.choice(RESOLUTIONS),
    ]
    return "\n".join(lines)


DOMAINS: dict[str, Callable[[random.Random], str]] = {
    "hospital": hospital_doc,
    "bank": bank_doc,
    "support": support_doc,
}


def _write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=True, sort_keys=True) + "\n")


def generate(out: Path) -> dict[str, int]:
    """Write every corpus file into `out`; returns bytes written per file."""
    out.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    for index, (silo, (count, mixture)) in enumerate(SILOS.items()):
        rng = random.Random(SEED + index)
        domains, shares = list(mixture), list(mixture.values())
        records = []
        for _ in range(count):
            domain = rng.choices(domains, weights=shares)[0]
            records.append({"domain": domain, "text": DOMAINS[domain](rng)})
        path = out / f"{silo}.jsonl"
        _write_jsonl(path, records)
        sizes[path.name] = path.stat().st_size
    rng = random.Random(SEED + 1000)
    records = [{"domain": d, "text": DOMAINS[d](rng)} for _ in range(EVAL_PER_DOMAIN) for d in DOMAINS]
    path = out / "eval.jsonl"
    _write_jsonl(path, records)
    sizes[path.name] = path.stat().st_size
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    args = parser.parse_args()
    for name, size in generate(args.out).items():
        print(f"{args.out / name}: {size:,} bytes")


if __name__ == "__main__":
    main()
