"""The one text form of a phase profile, printed by `analyze` and by `serve` alike.

Phases are ranges of hidden indices, both ends included: mix 0..compress_start-1, compress
compress_start..refine_start-1, refine refine_start..L (``phases`` is the profile's ``phases`` dict).
"""

from __future__ import annotations


def phase_ranges(phases: dict, n_layers: int) -> list[tuple[str, int, int]]:
    """[(name, first hidden index, last hidden index)] of mix, compress, refine; [] when not found."""
    if not phases.get("found"):
        return []
    c, r = int(phases["compress_start"]), int(phases["refine_start"])
    return [("mix", 0, c - 1), ("compress", c, r - 1), ("refine", r, n_layers)]


def phase_lines(phases: dict, n_layers: int) -> list[str]:
    """One line per phase, e.g. 'compress hidden 12..28  (40%..97% of depth)'."""
    ranges = phase_ranges(phases, n_layers)
    if not ranges:
        return [f"phases not found: {phases.get('note') or 'no massive activation'}"]
    lines = []
    for name, first, last in ranges:
        line = f"{name:<8} hidden {first}..{last}"
        if name == "compress":
            line += f"  ({first / n_layers:.0%}..{(last + 1) / n_layers:.0%} of depth)"
        lines.append(line)
    return lines


def phase_line(phases: dict, n_layers: int) -> str:
    """The phases on one line (the server's start-up message): the same words as phase_lines."""
    return "; ".join(" ".join(line.split()) for line in phase_lines(phases, n_layers))


def position0_label(bos: dict) -> str:
    """What position 0 holds, for a summary: 'position 0 (<|im_start|>)' or 'position 0 (first text token)'."""
    token = bos.get("token")
    return f"position 0 ({token})" if token else "position 0 (first text token)"


def phase_summary(result) -> str:
    """The summary `mcr-exit analyze` prints: provenance, phases, onsets, peaks, correlations, outputs."""
    doc, p = result.profile, result.phases
    L = doc["n_layers"]
    pos0 = position0_label(doc["bos"])
    lines = [f"{doc['model']['name']}: {L} blocks, {doc['data']['n_prompts']} prompts of {doc['data']['name']}, "
             f"position 0 = {doc['bos']['token'] or 'first text token'} ({doc['bos']['reason']})"]
    lines += [f"  {line}" for line in phase_lines(doc["phases"], L)]
    if p.found:
        lines += [
            f"  onsets: massive activation at hidden {p.massive_activation_layer}, entropy valley at hidden "
            f"{p.entropy_valley_layer}, sink surge at block {p.sink_surge_layer}",
            f"  peak norm ratio {pos0} / other tokens {p.peak_norm_ratio:.1f}, min entropy {p.min_entropy:.3f} "
            f"nats; compression carried by {p.carrier} (c/(c+alpha) = {p.carrier_norm_share:.3f})",
        ]
    if doc.get("massive_activations"):
        lines.append(f"  {spike_line(doc['massive_activations'])}")
    lines += [
        f"  corr(d position-0 norm, d entropy) = {p.corr_bos_entropy:+.2f}; "
        f"corr(d position-0 norm, d sink rate next block) = {p.corr_bos_sink_lag1:+.2f}",
        f"  embedding layer: hidden {doc['embedding_layer']} ({doc['embedding_layer_source']['reason']})",
        f"  outputs: {result.output_dir}" + (f"; MLflow run {result.run_id}" if result.run_id else ""),
        f"  took {result.seconds:.1f} s",
    ]
    return "\n".join(lines)


def spike_line(summary: dict) -> str:
    """One line for the analysis summary: where the largest-norm token sits, named when not position 0."""
    s, top = summary["shares_at_peak"], (summary["top_tokens_at_peak"] or [None])[0]
    shares = ", ".join(f"{k} {v:.0%}" for k, v in s.items())
    where = (f"hidden {summary['peak_layer']}, median top-token ratio {summary['peak_median_ratio']:.3g}, "
             f"massive in {summary.get('massive_share_at_peak', 0):.0%} of prompts")
    if top is None:
        return f"largest-norm tokens: none ({where})"
    if not summary["found"]:
        return f"largest-norm tokens: no massive activation at any position ({where}; top token: {shares})"
    if summary["at_position0"]:
        what = (repr(top["token"]) if top.get("distinct_texts", 1) == 1
                else f"{top.get('distinct_texts')} different first tokens, e.g. {top['token']!r}")
        return f"massive activation on position 0 ({what}) at {where}; top token: {shares}"
    return (f"massive activation NOT at position 0: on {top['token']!r} (position {top['position']}, "
            f"{top['category']}, {top['share']:.0%} of prompts) at {where}; top token: {shares}")
