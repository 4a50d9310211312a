"""Compiled (numba) kernels for the map matcher's hot path.

The matcher's per-ping work is sequential (a Viterbi recursion whose every step depends on the
previous one) over tiny arrays (a handful of candidates per ping), so numpy's per-call overhead
(about 1 µs a call, a dozen calls a ping) dominated it. These kernels run that work compiled:

* :func:`nearby_candidates` — the spatial-index query behind
  :meth:`geo.network.RoadNetwork.nearby_segments` (same rows, same order);
* :func:`viterbi_run` — candidates of one device's pings in, the online Viterbi recursion with
  convergence and fixed-lag decisions (:class:`geo.matcher.OnlineMatcher`), decided positions out;
* :func:`emit_traversals` — decided positions in, traversals (with interpolated times) out;
* :func:`ping_candidates`, :func:`viterbi_emit`, :func:`place_decided`, :func:`snap_matched` —
  the above as the matcher calls them, fused so that a push costs few calls from Python (each
  costs microseconds, and every array handed back about one).

They implement, line by line, the same arithmetic as the numpy code they replace (no fast-math),
so results are identical. Compiled code is cached on disk (``cache=True``) after the first run.
Units as in :mod:`geo.matcher`: metres, seconds.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

#: Event kinds in :func:`viterbi_run`'s output.
EV_START, EV_MOVE, EV_END = 0, 1, 2
#: Ping status codes (non-negative statuses are step numbers).
ST_NO_CANDIDATE, ST_NO_TRANSITION = -1, -2
#: Indices into the scalar state vector of :func:`viterbi_run`.
SC_ANCHORED, SC_OUTLIERS, SC_SEQ, SC_TRIP, SC_X, SC_Y, SC_GAP_SPLITS, SC_BREAK_SPLITS = range(8)
#: Indices into the open-traversal vector of :func:`emit_traversals`.
OT_SEG, OT_T_ENTER, OT_ENTRY_OFF, OT_POS_OFF, OT_PREV_SEG, OT_PREV_OFF, OT_PREV_TS = range(7)
#: Indices into the float configuration vector of :func:`viterbi_run`.
(CF_MAX_GAP_S, CF_BEAM, CF_MAX_DETOUR_M, CF_VMAX_MPS, CF_SPEED_SLACK_M, CF_UTURN_M, CF_BACKTRACK_M, CF_BETA_M,
 CF_BETA_SIGMAS, CF_MAX_LAG_S, CF_DELTA_M, CF_MAX_OUTLIERS) = range(12)
N_CONFIG = 12


# ---------------------------------------------------------------- spatial index
#: Columns of the per-cell piece table of :func:`nearby_candidates`.
PC_AX, PC_AY, PC_ABX, PC_ABY, PC_INV_LEN2, PC_OFFSET, PC_LEN, PC_SEGMENT = range(8)


@nb.njit(cache=True, nogil=True)
def nearby_candidates(px, py, radius, origin_x, origin_y, cell_m, grid_nx, grid_ny, cell_ptr, cell_data,
                      length_m, reverse_of, max_per_point, buf_cap, out_cap):
    """Segments within ``radius[i]`` of each point, nearest first (see ``RoadNetwork.nearby_segments``).

    ``cell_data`` holds one row per (grid cell, piece) entry, in cell order (CSR ``cell_ptr``), with
    the piece's start, vector, 1 / length², offset along its segment, length and segment row
    (``PC_*`` columns), so a cell's pieces are read from contiguous memory.
    Returns ``(ok, ptr, segment, distance_m, offset_m, snap_x, snap_y)``, rows grouped by point
    (CSR ``ptr``), each point's rows ordered by distance rounded to 0.1 mm, then segment row.
    ``ok`` is False when a point had more than ``buf_cap`` // 2 segments in range or the output
    more than ``out_cap`` rows: call again with larger capacities. (Fixed buffers: growing them
    inside the loop made the compiled loop 1.5x slower.)
    """
    n = len(px)
    cap = out_cap
    out_seg = np.empty(cap, np.int64)
    out_d = np.empty(cap, np.float64)
    out_o = np.empty(cap, np.float64)
    out_x = np.empty(cap, np.float64)
    out_y = np.empty(cap, np.float64)
    ptr = np.zeros(n + 1, np.int64)
    # Per point: best piece per segment (by 0.1 mm distance), then both directions, sorted.
    buf_seg = np.empty(buf_cap, np.int64)
    buf_mm = np.empty(buf_cap, np.int64)
    buf_d = np.empty(buf_cap, np.float64)
    buf_o = np.empty(buf_cap, np.float64)
    buf_x = np.empty(buf_cap, np.float64)
    buf_y = np.empty(buf_cap, np.float64)
    order = np.empty(buf_cap, np.int64)
    m = 0
    for i in range(n):
        x = px[i]
        y = py[i]
        r = radius[i]
        r2 = r * r
        c0x = np.int64((x - r - origin_x) // cell_m)
        c0y = np.int64((y - r - origin_y) // cell_m)
        c1x = np.int64((x + r - origin_x) // cell_m)
        c1y = np.int64((y + r - origin_y) // cell_m)
        k = 0
        for cx in range(max(c0x, 0), min(c1x, grid_nx - 1) + 1):
            # Skip cells entirely farther than r (the corners of the query square).
            ddx = max(origin_x + cx * cell_m - x, 0.0, x - (origin_x + (cx + 1) * cell_m))
            for cy in range(max(c0y, 0), min(c1y, grid_ny - 1) + 1):
                ddy = max(origin_y + cy * cell_m - y, 0.0, y - (origin_y + (cy + 1) * cell_m))
                if ddx * ddx + ddy * ddy > r2 * 1.000001 + 1e-6:
                    continue
                cell = cx * grid_ny + cy
                for q in range(cell_ptr[cell], cell_ptr[cell + 1]):
                    ax = cell_data[q, PC_AX]
                    ay = cell_data[q, PC_AY]
                    abx = cell_data[q, PC_ABX]
                    aby = cell_data[q, PC_ABY]
                    apx = x - ax
                    apy = y - ay
                    t = (apx * abx + apy * aby) * cell_data[q, PC_INV_LEN2]
                    t = min(max(t, 0.0), 1.0)
                    dx = apx - t * abx
                    dy = apy - t * aby
                    d2 = dx * dx + dy * dy
                    if not d2 <= r2:
                        continue
                    dist = math.sqrt(d2)
                    seg = np.int64(cell_data[q, PC_SEGMENT])
                    mm = np.int64(np.rint(dist * 1e4))
                    off = cell_data[q, PC_OFFSET] + t * cell_data[q, PC_LEN]
                    # This point's segments are few: a linear scan finds the segment's slot.
                    slot = -1
                    for u in range(k):
                        if buf_seg[u] == seg:
                            slot = u
                            break
                    if slot >= 0:
                        # Best piece of a segment: nearest (0.1 mm), then exactly nearest, then first along it.
                        if mm > buf_mm[slot] or (mm == buf_mm[slot] and (
                                dist > buf_d[slot] or (dist == buf_d[slot] and off >= buf_o[slot]))):
                            continue
                    else:
                        if 2 * (k + 1) > buf_cap:
                            return False, ptr, out_seg[:0], out_d[:0], out_o[:0], out_x[:0], out_y[:0]
                        slot = k
                        k += 1
                        buf_seg[slot] = seg
                    buf_mm[slot] = mm
                    buf_d[slot] = dist
                    buf_o[slot] = off
                    buf_x[slot] = ax + t * abx
                    buf_y[slot] = ay + t * aby
        # The opposite direction of a two-way piece: same distance and point, mirrored offset
        # (the buffers have room for both directions of every segment found).
        k1 = k
        for s in range(k1):
            rv = reverse_of[buf_seg[s]]
            if rv >= 0:
                buf_seg[k] = rv
                buf_mm[k] = buf_mm[s]
                buf_d[k] = buf_d[s]
                buf_o[k] = length_m[rv] - buf_o[s]
                buf_x[k] = buf_x[s]
                buf_y[k] = buf_y[s]
                k += 1
        # Insertion sort on (0.1 mm distance, segment row): a few entries per point.
        for s in range(k):
            o = s
            key_mm = buf_mm[s]
            key_seg = buf_seg[s]
            while o > 0:
                prev = order[o - 1]
                if buf_mm[prev] < key_mm or (buf_mm[prev] == key_mm and buf_seg[prev] < key_seg):
                    break
                order[o] = prev
                o -= 1
            order[o] = s
        take = k if max_per_point < 0 else min(k, max_per_point)
        if m + take > cap:
            return False, ptr, out_seg[:0], out_d[:0], out_o[:0], out_x[:0], out_y[:0]
        for s in range(take):
            o = order[s]
            out_seg[m] = buf_seg[o]
            out_d[m] = buf_d[o]
            out_o[m] = buf_o[o]
            out_x[m] = buf_x[o]
            out_y[m] = buf_y[o]
            m += 1
        ptr[i + 1] = m
    return True, ptr, out_seg[:m], out_d[:m], out_o[:m], out_x[:m], out_y[:m]


# ------------------------------------------------------------------ route table
@nb.njit(cache=True, nogil=True)
def table_find(row_ptr, col, gap_m, a, b, max_gap_m):
    """Entry of the pair (a, b) in :class:`geo.routing.RouteTable`'s rows, -1 if absent or if its
    gap exceeds ``max_gap_m`` (rows are ordered by gap, so the scan stops there)."""
    for i in range(row_ptr[a], row_ptr[a + 1]):
        if gap_m[i] > max_gap_m:
            return -1
        if col[i] == b:
            return i
    return -1


@nb.njit(cache=True, nogil=True)
def table_find_many(row_ptr, col, gap_m, a, b):
    """:func:`table_find` for arrays of pairs (no gap bound)."""
    out = np.empty(len(a), np.int64)
    for i in range(len(a)):
        out[i] = table_find(row_ptr, col, gap_m, a[i], b[i], np.inf)
    return out


# ---------------------------------------------------------------------- Viterbi
@nb.njit(cache=True, nogil=True)
def _transition(sa, oa, sb, ob, gc, lim, sigma_b, gap, length_m, reverse_of, cf):
    """Log transition score from (sa, oa) to (sb, ob): ``OnlineMatcher._combo_scores`` for one pair.

    ``gap``: the route table's gap from sa to sb, ``inf`` if absent or beyond ``lim`` + 1 m.
    """
    la = length_m[sa]
    route = (la - oa) + gap + ob
    if reverse_of[sa] == sb:
        p = max(oa, la - ob)
        turn = (p - oa) + (p - (la - ob)) + cf[CF_UTURN_M]
        route = min(turn, route)
    if sa == sb:
        back = oa - ob
        tol = max(cf[CF_BACKTRACK_M], 2.0 * sigma_b)
        if back <= 0:
            route = -back
        elif back > tol:
            route = back + 1.5 * cf[CF_UTURN_M]
        else:
            route = 0.0
    if route > lim:
        route = np.inf
    beta = max(cf[CF_BETA_M], cf[CF_BETA_SIGMAS] * sigma_b)
    return -abs(route - gc) / beta


@nb.njit(cache=True, nogil=True)
def _first_argmax(a, lo, hi):
    best = lo
    for q in range(lo + 1, hi):
        if a[q] > a[best]:
            best = q
    return best - lo


@nb.njit(cache=True, nogil=True)
def viterbi_run(w_ts, w_seq, w_ptr, w_seg, w_off, w_bp, w_scores, sc,
                p_ts, p_x, p_y, p_sigma, c_ptr, c_seg, c_off, c_emis, i0, pre_trans, finish,
                status, length_m, reverse_of, row_ptr, col, gap_m, cf):
    """Feed pings ``i0..`` of one device into its undecided window (``OnlineMatcher._run``).

    The window: steps ``w_ts``/``w_seq``, candidates in CSR ``w_ptr`` -> ``w_seg``/``w_off``/``w_bp``
    (back pointer into the previous step's candidates), ``w_scores`` of the newest step's candidates;
    ``sc`` the scalar state (``SC_*``, updated in place). Pings: times, metric x/y, sigma and
    candidates in CSR ``c_ptr``. ``status[i]`` gets the ping's step number or an ``ST_*`` code.

    Stops early at a ping whose transitions may need routes beyond the table's bound (a bounded
    Dijkstra, done by the caller): returns its index, and the caller calls again from there with
    ``pre_trans`` (its transition scores, previous step x candidates). ``finish`` ends the trip
    after the last ping.

    Returns ``(stop, S, M, K, E, wi, wf, ei, ef)``: the new window of S steps, M candidates and K
    scores packed as ``wi = [seq | ptr | seg | bp]``, ``wf = [ts | off | scores]``, and the E decided
    positions, in order, as ``ei = [kind | seq | seg]`` (``EV_*`` kinds), ``ef = [off | ts]``
    (:func:`unpack_window` / :func:`unpack_events` split them).
    """
    n_p = len(p_ts)
    S = len(w_ts)
    M = w_ptr[S]
    extra = c_ptr[n_p] - c_ptr[i0]
    cap_s = S + (n_p - i0) + 1
    cap_m = M + extra + 1
    ts = np.empty(cap_s, np.float64)
    seqs = np.empty(cap_s, np.int64)
    ptr = np.zeros(cap_s + 1, np.int64)
    seg = np.empty(cap_m, np.int64)
    off = np.empty(cap_m, np.float64)
    bp = np.empty(cap_m, np.int64)
    ts[:S] = w_ts
    seqs[:S] = w_seq
    ptr[:S + 1] = w_ptr[:S + 1]
    seg[:M] = w_seg[:M]
    off[:M] = w_off[:M]
    bp[:M] = w_bp[:M]
    kmax = 1
    for k in range(S):
        kmax = max(kmax, ptr[k + 1] - ptr[k])
    for i in range(i0, n_p):
        kmax = max(kmax, c_ptr[i + 1] - c_ptr[i])
    scores = np.empty(kmax, np.float64)
    ns = len(w_scores)
    scores[:ns] = w_scores
    best = np.empty(kmax, np.float64)
    best_a = np.empty(kmax, np.int64)
    gaps = np.empty(kmax, np.float64)
    order_a = np.empty(kmax, np.int64)
    # A sparse hash set (at most 1/16 full): a route-table entry that is no candidate, nearly all
    # of them, then usually lands on an empty slot, and the probe loop's branch stays predictable
    # (half full, it was 5-7 % slower).
    hsize = 16
    while hsize < 16 * kmax:
        hsize *= 2
    hmask = hsize - 1
    hkey = np.full(hsize, -1, np.int64)
    hval = np.empty(hsize, np.int64)
    scratch = np.empty(4 * kmax + 4, np.int64)
    cap_e = 2 * (S + n_p - i0) + 4
    ev_kind = np.empty(cap_e, np.int64)
    ev_seq = np.empty(cap_e, np.int64)
    ev_seg = np.empty(cap_e, np.int64)
    ev_off = np.empty(cap_e, np.float64)
    ev_ts = np.empty(cap_e, np.float64)
    st = np.zeros(3, np.int64)  # S, number of events, number of scores
    st[0] = S
    st[2] = ns
    max_gap = cf[CF_MAX_GAP_S]
    beam = cf[CF_BEAM]
    stop = n_p
    for i in range(i0, n_p):
        b0 = c_ptr[i]
        b1 = c_ptr[i + 1]
        if b0 == b1:
            status[i] = ST_NO_CANDIDATE
            continue
        t = p_ts[i]
        if st[0] > 0 and t - ts[st[0] - 1] > max_gap:
            sc[SC_GAP_SPLITS] += 1
            _end_trip(ts, seqs, ptr, seg, off, bp, scores, st, sc, ev_kind, ev_seq, ev_seg, ev_off, ev_ts, scratch)
        if st[0] == 0:
            _start_step(t, p_x[i], p_y[i], b0, b1, c_seg, c_off, c_emis, beam, ts, seqs, ptr, seg, off, bp,
                        scores, st, sc)
        else:
            S = st[0]
            a0 = ptr[S - 1]
            a1 = ptr[S]
            dt = t - ts[S - 1]
            gc = math.hypot(p_x[i] - sc[SC_X], p_y[i] - sc[SC_Y])
            lim = gc + cf[CF_MAX_DETOUR_M]
            if dt > 0:
                lim = min(lim, cf[CF_VMAX_MPS] * dt + cf[CF_SPEED_SLACK_M])
            use_pre = i == i0 and pre_trans.shape[0] > 0
            if lim > cf[CF_DELTA_M] and not use_pre:
                stop = i
                break
            sig = p_sigma[i]
            ka = a1 - a0
            kb = b1 - b0
            # Viterbi step, exact but pruned: transitions are never positive, so a previous
            # candidate whose score is already below a current candidate's best total cannot win
            # (or tie) it. Previous candidates in order of score, best first; ties keep the lowest
            # index, as argmax does.
            for q in range(ka):
                o = q
                while o > 0 and scores[order_a[o - 1]] < scores[q]:
                    order_a[o] = order_a[o - 1]
                    o -= 1
                order_a[o] = q
            for b in range(kb):
                best[b] = -np.inf
                best_a[b] = -1
            if not use_pre:
                # The current candidates' segments go into a small hash set (segment -> index),
                # so each route-table entry scanned costs one probe however busy the junction.
                for b in range(kb):
                    h = (c_seg[b0 + b] * 2654435761) & hmask
                    while hkey[h] != -1:
                        h = (h + 1) & hmask
                    hkey[h] = c_seg[b0 + b]
                    hval[h] = b
            for q in range(ka):
                a = order_a[q]
                sa_score = scores[a]
                needed = False
                for b in range(kb):
                    if not sa_score < best[b]:
                        needed = True
                        break
                if not needed:
                    break  # every later candidate scores lower still
                if not use_pre:
                    # Route-table gaps from this candidate's segment: one scan of its row, nearest
                    # first, up to the bound. A gap beyond lim (+ 1 m for float32 offsets a hair
                    # past a segment's end) makes the route exceed lim whatever the offsets: the
                    # same as no entry.
                    for b in range(kb):
                        gaps[b] = np.inf
                    sa = seg[a0 + a]
                    bound = lim + 1.0
                    for e in range(row_ptr[sa], row_ptr[sa + 1]):
                        g = gap_m[e]
                        if g > bound:
                            break
                        ce = np.int64(col[e])
                        h = (ce * 2654435761) & hmask
                        while hkey[h] != -1:
                            if hkey[h] == ce:
                                gaps[hval[h]] = g
                                break
                            h = (h + 1) & hmask
                for b in range(kb):
                    if sa_score < best[b]:
                        continue
                    if use_pre:
                        tr = pre_trans[a, b]
                    else:
                        tr = _transition(seg[a0 + a], off[a0 + a], c_seg[b0 + b], c_off[b0 + b], gc, lim, sig,
                                         gaps[b], length_m, reverse_of, cf)
                    tot = sa_score + tr
                    if best_a[b] < 0 or tot > best[b] or (tot == best[b] and a < best_a[b]):
                        best[b] = tot
                        best_a[b] = a
            if not use_pre:
                for b in range(kb):
                    h = (c_seg[b0 + b] * 2654435761) & hmask
                    while hkey[h] != -1:
                        hkey[h] = -1
                        h = (h + 1) & hmask
            top = -np.inf
            for b in range(kb):
                v = best[b] + c_emis[b0 + b]
                best[b] = v
                if b == 0 or v > top:
                    top = v
            if not np.isfinite(top):
                sc[SC_OUTLIERS] += 1
                if sc[SC_OUTLIERS] <= cf[CF_MAX_OUTLIERS]:
                    status[i] = ST_NO_TRANSITION
                    continue
                sc[SC_BREAK_SPLITS] += 1
                _end_trip(ts, seqs, ptr, seg, off, bp, scores, st, sc, ev_kind, ev_seq, ev_seg, ev_off, ev_ts,
                          scratch)
                _start_step(t, p_x[i], p_y[i], b0, b1, c_seg, c_off, c_emis, beam, ts, seqs, ptr, seg, off, bp,
                            scores, st, sc)
            else:
                sc[SC_OUTLIERS] = 0
                S = st[0]
                m = ptr[S]
                k = 0
                for b in range(b1 - b0):
                    s = best[b] - top
                    if s >= -beam:
                        seg[m] = c_seg[b0 + b]
                        off[m] = c_off[b0 + b]
                        bp[m] = best_a[b]
                        scores[k] = s
                        m += 1
                        k += 1
                ts[S] = t
                seqs[S] = np.int64(sc[SC_SEQ])
                ptr[S + 1] = m
                st[0] = S + 1
                st[2] = k
                sc[SC_SEQ] += 1
                sc[SC_X] = p_x[i]
                sc[SC_Y] = p_y[i]
        status[i] = np.int64(sc[SC_SEQ]) - 1
        _decide_ready(ts, seqs, ptr, seg, off, bp, scores, st, sc, ev_kind, ev_seq, ev_seg, ev_off, ev_ts, scratch,
                      cf[CF_MAX_LAG_S])
    if finish and stop == n_p:
        _end_trip(ts, seqs, ptr, seg, off, bp, scores, st, sc, ev_kind, ev_seq, ev_seg, ev_off, ev_ts, scratch)
    # Packed into four arrays: every array handed back to Python costs about as much as a ping.
    S = st[0]
    E = st[1]
    M = ptr[S]
    nk = st[2]
    wi = np.empty(2 * S + 1 + 2 * M, np.int64)
    wi[:S] = seqs[:S]
    wi[S:2 * S + 1] = ptr[:S + 1]
    wi[2 * S + 1:2 * S + 1 + M] = seg[:M]
    wi[2 * S + 1 + M:] = bp[:M]
    wf = np.empty(S + M + nk, np.float64)
    wf[:S] = ts[:S]
    wf[S:S + M] = off[:M]
    wf[S + M:] = scores[:nk]
    ei = np.empty(3 * E, np.int64)
    ei[:E] = ev_kind[:E]
    ei[E:2 * E] = ev_seq[:E]
    ei[2 * E:] = ev_seg[:E]
    ef = np.empty(2 * E, np.float64)
    ef[:E] = ev_off[:E]
    ef[E:] = ev_ts[:E]
    return stop, S, M, nk, E, wi, wf, ei, ef


def unpack_window(S: int, M: int, wi: np.ndarray, wf: np.ndarray) -> tuple[np.ndarray, ...]:
    """:func:`viterbi_run`'s packed window as ``(ts, seq, ptr, seg, off, bp, scores)`` views."""
    return wf[:S], wi[:S], wi[S:2 * S + 1], wi[2 * S + 1:2 * S + 1 + M], wf[S:S + M], wi[2 * S + 1 + M:], wf[S + M:]


def unpack_events(E: int, ei: np.ndarray, ef: np.ndarray) -> tuple[np.ndarray, ...]:
    """:func:`viterbi_run`'s packed decided positions as ``(kind, seq, seg, off, ts)`` views."""
    return ei[:E], ei[E:2 * E], ei[2 * E:], ef[:E], ef[E:]


@nb.njit(cache=True, nogil=True)
def _start_step(t, x, y, b0, b1, c_seg, c_off, c_emis, beam, ts, seqs, ptr, seg, off, bp, scores, st, sc):
    """First step of a trip: scores are the emissions (relative to the best), pruned by the beam."""
    emax = c_emis[b0]
    for b in range(b0 + 1, b1):
        emax = max(emax, c_emis[b])
    S = st[0]
    m = ptr[S]
    k = 0
    for b in range(b0, b1):
        s = c_emis[b] - emax
        if s >= -beam:
            seg[m] = c_seg[b]
            off[m] = c_off[b]
            bp[m] = -1
            scores[k] = s
            m += 1
            k += 1
    ts[S] = t
    seqs[S] = np.int64(sc[SC_SEQ])
    ptr[S + 1] = m
    st[0] = S + 1
    st[2] = k
    sc[SC_SEQ] += 1
    sc[SC_X] = x
    sc[SC_Y] = y


@nb.njit(cache=True, nogil=True)
def _decide_ready(ts, seqs, ptr, seg, off, bp, scores, st, sc, ev_kind, ev_seq, ev_seg, ev_off, ev_ts, scratch,
                  max_lag_s):
    """Decide the converged prefix, then anything older than the lag bound (``OnlineMatcher._decide_ready``)."""
    S = st[0]
    first = 1 if sc[SC_ANCHORED] != 0 else 0
    last = S - 1
    conv = -1
    conv_idx = 0
    if ptr[S] - ptr[S - 1] == 1:
        conv = last
    elif last - 1 >= first:
        # Distinct ancestors, level by level, until one is left (the convergence point).
        half = len(scratch) // 2
        anc = scratch[:half]
        mark = scratch[half:]
        n_anc = 0
        width = ptr[last] - ptr[last - 1]
        for q in range(width):
            mark[q] = 0
        for q in range(ptr[last], ptr[S]):
            a = bp[q]
            if mark[a] == 0:
                mark[a] = 1
                anc[n_anc] = a
                n_anc += 1
        k = last - 1
        while k >= first:
            if n_anc == 1:
                conv = k
                conv_idx = anc[0]
                break
            if k == 0:
                break  # the first step of a trip has no ancestors
            width = ptr[k] - ptr[k - 1]
            for q in range(width):
                mark[q] = 0
            n_new = 0
            for q in range(n_anc):
                a = bp[ptr[k] + anc[q]]
                if mark[a] == 0:
                    mark[a] = 1
                    anc[n_anc + n_new] = a
                    n_new += 1
            for q in range(n_new):
                anc[q] = anc[n_anc + q]
            n_anc = n_new
            k -= 1
    if conv >= first:
        _decide(ts, seqs, ptr, seg, off, bp, scores, st, sc, ev_kind, ev_seq, ev_seg, ev_off, ev_ts, scratch,
                conv, conv_idx)
    # Fixed lag: force the best hypothesis for steps older than max_lag_s.
    S = st[0]
    first = 1 if sc[SC_ANCHORED] != 0 else 0
    horizon = ts[S - 1] - max_lag_s
    due = -1
    for k in range(S - 1, first - 1, -1):
        if ts[k] <= horizon:
            due = k
            break
    if due >= first:
        j = _first_argmax(scores, 0, st[2])
        for k in range(S - 1, due, -1):
            j = bp[ptr[k] + j]
        _decide(ts, seqs, ptr, seg, off, bp, scores, st, sc, ev_kind, ev_seq, ev_seg, ev_off, ev_ts, scratch,
                due, j)


@nb.njit(cache=True, nogil=True)
def _decide(ts, seqs, ptr, seg, off, bp, scores, st, sc, ev_kind, ev_seq, ev_seg, ev_off, ev_ts, scratch, c, j):
    """Fix candidate ``j`` of step ``c`` and its ancestors, record them as events, collapse the window."""
    S = st[0]
    E = st[1]
    first = 1 if sc[SC_ANCHORED] != 0 else 0
    # Chain of chosen candidates back from step c (stored in events order afterwards).
    n_chain = c + 1
    chain = np.empty(n_chain, np.int64)
    chain[c] = j
    for k in range(c, 0, -1):
        chain[k - 1] = bp[ptr[k] + chain[k]]
    if first == 0:
        q = ptr[0] + chain[0]
        ev_kind[E] = EV_START
        ev_seq[E] = seqs[0]
        ev_seg[E] = seg[q]
        ev_off[E] = off[q]
        ev_ts[E] = ts[0]
        E += 1
    for k in range(max(first, 1), c + 1):
        q = ptr[k] + chain[k]
        ev_kind[E] = EV_MOVE
        ev_seq[E] = seqs[k]
        ev_seg[E] = seg[q]
        ev_off[E] = off[q]
        ev_ts[E] = ts[k]
        E += 1
    st[1] = E
    # Collapse step c to the chosen candidate; keep only later hypotheses descending from it.
    # In place: every kept entry moves to a lower (or the same) index.
    half = len(scratch) // 2
    remap = scratch[:half]
    keep = scratch[half:]
    old_ptr = ptr[c:S + 1].copy()
    src = old_ptr[0] + j
    seg[0] = seg[src]
    off[0] = off[src]
    bp[0] = -1
    ts[0] = ts[c]
    seqs[0] = seqs[c]
    ptr[0] = 0
    ptr[1] = 1
    prev_w = old_ptr[1] - old_ptr[0]
    for q in range(prev_w):
        remap[q] = -1
    remap[j] = 0
    n_keep = 1
    keep[0] = j
    pos = 1
    for k in range(c + 1, S):
        a0 = old_ptr[k - c]
        a1 = old_ptr[k - c + 1]
        n_keep = 0
        for t in range(a0, a1):
            nb_ = remap[bp[t]]
            if nb_ >= 0:
                keep[n_keep] = t - a0
                n_keep += 1
                seg[pos] = seg[t]
                off[pos] = off[t]
                bp[pos] = nb_
                pos += 1
        for q in range(a1 - a0):
            remap[q] = -1
        for q in range(n_keep):
            remap[keep[q]] = q
        ts[k - c] = ts[k]
        seqs[k - c] = seqs[k]
        ptr[k - c + 1] = pos
    # Scores of the newest step: only the surviving candidates.
    for q in range(n_keep):
        scores[q] = scores[keep[q]]
    st[2] = n_keep
    st[0] = S - c
    sc[SC_ANCHORED] = 1


@nb.njit(cache=True, nogil=True)
def _end_trip(ts, seqs, ptr, seg, off, bp, scores, st, sc, ev_kind, ev_seq, ev_seg, ev_off, ev_ts, scratch):
    """Decide the best path through the window, close the trip (``OnlineMatcher._end_trip``)."""
    if st[0] > 0:
        j = _first_argmax(scores, 0, st[2])
        _decide(ts, seqs, ptr, seg, off, bp, scores, st, sc, ev_kind, ev_seq, ev_seg, ev_off, ev_ts, scratch,
                st[0] - 1, j)
        E = st[1]
        ev_kind[E] = EV_END
        ev_seq[E] = -1
        ev_seg[E] = -1
        ev_off[E] = 0.0
        ev_ts[E] = ts[st[0] - 1]
        st[1] = E + 1
    st[0] = 0
    st[2] = 0
    sc[SC_ANCHORED] = 0
    sc[SC_OUTLIERS] = 0
    sc[SC_TRIP] += 1


# ------------------------------------------------------------------- traversals
@nb.njit(cache=True, nogil=True)
def emit_traversals(ev_kind, ev_seg, ev_off, ev_ts, e0, ot, out_cap, length_m, reverse_of, row_ptr, col, gap_m,
                    pred, uturn_penalty_m, min_cover_m):
    """Turn decided positions ``e0..`` into traversals (``OnlineMatcher._advance`` / ``_close``).

    ``ot`` is the open-traversal state (``OT_*``, updated in place), including the previous decided
    position. Stops early, before event ``stop``, at a move whose route is not in the table
    (``why`` 1: the caller runs it with a bounded Dijkstra) or when the ``out_cap`` rows of output
    are full (``why`` 2: call again from ``stop`` with more). Returns ``(stop, why, seg, t_enter,
    t_exit, fraction)``. (Fixed buffers: growing them inside the loop slows the compiled loop.)
    """
    n_seg = len(length_m)
    n_e = len(ev_kind)
    cap = out_cap
    why = 0
    o_seg = np.empty(cap, np.int64)
    o_t0 = np.empty(cap, np.float64)
    o_t1 = np.empty(cap, np.float64)
    o_fr = np.empty(cap, np.float64)
    n = 0
    path = np.empty(cap, np.int64)
    stop = n_e
    for e in range(e0, n_e):
        kind = ev_kind[e]
        if kind == EV_START:
            ot[OT_SEG] = ev_seg[e]
            ot[OT_T_ENTER] = ev_ts[e]
            ot[OT_ENTRY_OFF] = ev_off[e]
            ot[OT_POS_OFF] = ev_off[e]
        elif kind == EV_END:
            if ot[OT_SEG] >= 0:
                if n + 1 > cap:
                    stop = e
                    why = 2
                    break
                n = _close(ot, np.int64(ot[OT_SEG]), ev_ts[e], ot[OT_POS_OFF], length_m, min_cover_m,
                           o_seg, o_t0, o_t1, o_fr, n)
            ot[OT_SEG] = -1
            ot[OT_POS_OFF] = 0.0
            ot[OT_ENTRY_OFF] = 0.0
            ot[OT_PREV_SEG] = -1
            continue
        else:
            sa = np.int64(ot[OT_PREV_SEG])
            oa = ot[OT_PREV_OFF]
            ta = ot[OT_PREV_TS]
            sb = ev_seg[e]
            ob = ev_off[e]
            tb = ev_ts[e]
            if sa == sb:
                # Forward along the segment, or backward jitter of a stopped device: no new segment.
                ot[OT_POS_OFF] = max(ot[OT_POS_OFF], ob)
            else:
                la = length_m[sa]
                # Segments strictly between sa and sb, walked back through the table's predecessors.
                n_path = 0
                node = sb
                found = False
                for _ in range(n_seg + 1):
                    q = table_find(row_ptr, col, gap_m, sa, node, np.inf)
                    p = np.int64(pred[q]) if q >= 0 else -1
                    if p < 0:
                        break
                    if p == sa:
                        found = True
                        break
                    if n_path == cap:
                        break
                    path[n_path] = p
                    n_path += 1
                    node = p
                if not found:
                    stop = e
                    why = 2 if n_path == cap else 1
                    break
                if n + 1 + n_path > cap:
                    stop = e
                    why = 2
                    break
                done = False
                if reverse_of[sa] == sb:
                    q = table_find(row_ptr, col, gap_m, sa, sb, np.inf)
                    gap = np.float64(gap_m[q]) if q >= 0 else np.inf
                    p = max(oa, la - ob)
                    d1 = p - oa
                    turn = d1 + (p - (la - ob))
                    if turn + uturn_penalty_m <= (la - oa) + gap + ob:
                        t_turn = ta + (tb - ta) * (d1 / turn) if turn > 0 else ta
                        n = _close(ot, sa, t_turn, max(p, ot[OT_POS_OFF]), length_m, min_cover_m,
                                   o_seg, o_t0, o_t1, o_fr, n)
                        ot[OT_SEG] = sb
                        ot[OT_T_ENTER] = t_turn
                        ot[OT_ENTRY_OFF] = la - p
                        ot[OT_POS_OFF] = ob
                        done = True
                if not done:
                    total_len = 0.0
                    for q in range(n_path - 1, -1, -1):
                        total_len += length_m[path[q]]
                    total = (la - oa) + total_len + ob
                    rate = (tb - ta) / total if total > 0 else 0.0
                    x = la - oa
                    t = ta + rate * x
                    n = _close(ot, sa, t, la, length_m, min_cover_m, o_seg, o_t0, o_t1, o_fr, n)
                    for q in range(n_path - 1, -1, -1):
                        s = path[q]
                        ls = length_m[s]
                        t_next = ta + rate * (x + ls)
                        o_seg[n] = s
                        o_t0[n] = t
                        o_t1[n] = t_next
                        o_fr[n] = 1.0
                        n += 1
                        x += ls
                        t = t_next
                    ot[OT_SEG] = sb
                    ot[OT_T_ENTER] = t
                    ot[OT_ENTRY_OFF] = 0.0
                    ot[OT_POS_OFF] = ob
        ot[OT_PREV_SEG] = ev_seg[e]
        ot[OT_PREV_OFF] = ev_off[e]
        ot[OT_PREV_TS] = ev_ts[e]
    return stop, why, o_seg[:n].copy(), o_t0[:n].copy(), o_t1[:n].copy(), o_fr[:n].copy()


@nb.njit(cache=True, nogil=True)
def _close(ot, seg, t_exit, exit_off, length_m, min_cover_m, o_seg, o_t0, o_t1, o_fr, n):
    """Emit the open traversal of ``seg`` up to ``exit_off`` at ``t_exit`` (``OnlineMatcher._close``)."""
    la = length_m[seg]
    covered = exit_off - ot[OT_ENTRY_OFF]
    frac = 1.0 if la <= 0 else min(1.0, covered / la)
    # A touch of less than min_cover_m (turning at a node, float rounding) is no traversal.
    if covered >= min_cover_m or frac >= 0.999:
        o_seg[n] = seg
        o_t0[n] = ot[OT_T_ENTER]
        o_t1[n] = t_exit
        o_fr[n] = frac
        n += 1
    ot[OT_SEG] = -1
    return n


# ------------------------------------------------------------------- geometry
@nb.njit(cache=True, nogil=True)
def points_at_offsets(geom_x, geom_y, geom_ptr, cum, length_m, segments, offsets_m):
    """Points ``offsets_m`` metres along ``segments`` (``geo.matcher.points_at_offsets``).

    ``cum``: cumulative vertex distance along the vertex arrays. Returns x, y arrays (metres).
    """
    n = len(segments)
    px = np.empty(n, np.float64)
    py = np.empty(n, np.float64)
    for i in range(n):
        s = segments[i]
        lo = geom_ptr[s]
        hi = geom_ptr[s + 1] - 2
        start = cum[lo]
        target = start + min(max(offsets_m[i], 0.0), length_m[s])
        # Last vertex j of the segment with cum[j] <= target (the first one if none).
        j = lo
        a = lo
        b = hi
        while a <= b:
            mid = (a + b) >> 1
            if cum[mid] <= target:
                j = mid
                a = mid + 1
            else:
                b = mid - 1
        piece = max(cum[j + 1] - cum[j], 1e-12)
        t = min(max((target - cum[j]) / piece, 0.0), 1.0)
        px[i] = geom_x[j] + t * (geom_x[j + 1] - geom_x[j])
        py[i] = geom_y[j] + t * (geom_y[j + 1] - geom_y[j])
    return px, py


# ------------------------------------------------------------------ candidates
@nb.njit(cache=True, nogil=True)
def ping_candidates(px, py, sigma, min_radius, radius_sigmas, origin_x, origin_y, cell_m, grid_nx, grid_ny,
                    cell_ptr, cell_data, length_m, reverse_of, max_per_point, buf_cap, out_cap):
    """Candidates of the matcher's pings with their emission scores (``OnlineMatcher._candidates``).

    The search radius of ping ``i`` is ``max(min_radius, radius_sigmas * sigma[i])`` (metres);
    the search is :func:`nearby_candidates`. Returns ``(ok, ptr, segment, offset, emission)``:
    offsets rounded to float32 (the matcher state stores them so), emissions
    ``-0.5 (distance / sigma)^2``, in the same arithmetic as the numpy expressions they replace.
    ``ok`` False: call again with larger capacities (see :func:`nearby_candidates`).
    """
    n = len(px)
    radius = np.empty(n, np.float64)
    for i in range(n):
        radius[i] = max(min_radius, radius_sigmas * sigma[i])
    ok, ptr, seg, dist, off, _, _ = nearby_candidates(px, py, radius, origin_x, origin_y, cell_m, grid_nx, grid_ny,
                                                      cell_ptr, cell_data, length_m, reverse_of, max_per_point,
                                                      buf_cap, out_cap)
    m = len(seg)
    offs = np.empty(m, np.float64)
    emis = np.empty(m, np.float64)
    if ok:
        for i in range(n):
            s = sigma[i]
            for q in range(ptr[i], ptr[i + 1]):
                offs[q] = np.float64(np.float32(off[q]))
                z = dist[q] / s
                emis[q] = -0.5 * (z * z)
    return ok, ptr, seg, offs, emis


# ------------------------------------------------------------------ batch output
@nb.njit(cache=True, nogil=True)
def place_decided(kept_at, status, trip0, ev_kind, ev_seq, ev_seg, ev_off, seg, off, trip):
    """Write each matched ping's decided position into the per-ping arrays (``geo.matcher.match_trace``).

    ``status``: step number (or ``ST_*`` code) of each accepted ping, ``kept_at`` its index in the
    trace; events as from :func:`viterbi_run` (``EV_END`` closes trip ``trip0``, then the next).
    ``seg``, ``off``, ``trip`` (one entry per trace ping) are updated in place; a step decided more
    than once takes its last decision.
    """
    top = -1
    for i in range(len(status)):
        top = max(top, status[i])
    for e in range(len(ev_seq)):
        top = max(top, ev_seq[e])
    at = np.full(top + 1, -1, np.int64)
    ev_trip = np.empty(len(ev_kind), np.int64)
    t = trip0
    for e in range(len(ev_kind)):
        if ev_kind[e] == EV_END:
            t += 1
        else:
            at[ev_seq[e]] = e
            ev_trip[e] = t
    for i in range(len(status)):
        s = status[i]
        if s >= 0:
            e = at[s]
            if e >= 0:
                p = kept_at[i]
                seg[p] = ev_seg[e]
                off[p] = ev_off[e]
                trip[p] = ev_trip[e]


@nb.njit(cache=True, nogil=True)
def snap_matched(seg, off, segment_ids, geom_x, geom_y, geom_ptr, cum, length_m):
    """Segment ids of the matched pings (-1 where ``seg`` is -1) and, for the matched ones, their
    indices and snapped metric points (:func:`points_at_offsets`). Returns ``(ids, rows, x, y)``."""
    n = len(seg)
    ids = np.empty(n, np.int64)
    rows = np.empty(n, np.int64)
    k = 0
    for i in range(n):
        if seg[i] >= 0:
            ids[i] = segment_ids[seg[i]]
            rows[k] = i
            k += 1
        else:
            ids[i] = -1
    rows = rows[:k]
    x, y = points_at_offsets(geom_x, geom_y, geom_ptr, cum, length_m, seg[rows], off[rows])
    return ids, rows, x, y


@nb.njit(cache=True, nogil=True)
def emit_traversals_packed(ev_kind, ev_seg, ev_off, ev_ts, e0, ot, out_cap, segment_ids, length_m, reverse_of,
                           row_ptr, col, gap_m, pred, uturn_penalty_m, min_cover_m):
    """:func:`emit_traversals` with the output as the matcher takes it: ``(stop, why, ids, times)``,
    segment ids and one (3, n) array of entry times, exit times and fractions (each array handed
    back to Python costs about a microsecond)."""
    stop, why, seg, t0, t1, frac = emit_traversals(ev_kind, ev_seg, ev_off, ev_ts, e0, ot, out_cap, length_m,
                                                   reverse_of, row_ptr, col, gap_m, pred, uturn_penalty_m,
                                                   min_cover_m)
    n = len(seg)
    ids = np.empty(n, np.int64)
    times = np.empty((3, n), np.float64)
    for i in range(n):
        ids[i] = segment_ids[seg[i]]
        times[0, i] = t0[i]
        times[1, i] = t1[i]
        times[2, i] = frac[i]
    return stop, why, ids, times


@nb.njit(cache=True, nogil=True)
def viterbi_emit(w_ts, w_seq, w_ptr, w_seg, w_off, w_bp, w_scores, sc,
                 p_ts, p_x, p_y, p_sigma, c_ptr, c_seg, c_off, c_emis, i0, pre_trans, finish,
                 status, length_m, reverse_of, row_ptr, col, gap_m, cf,
                 ot, segment_ids, pred, uturn_penalty_m, min_cover_m):
    """:func:`viterbi_run`, then, if it ran to the end, :func:`emit_traversals_packed` on its
    events from the first (``e0`` 0, room for ``4 E + 64`` traversals), in one call from Python.

    A call from Python costs several microseconds and each array handed back about one, as much
    as a ping's work: so one call, and everything in two arrays. Returns ``(stop, S, M, K, E,
    estop, why, T, ints, floats)``: ``ints`` = viterbi_run's ``wi``, ``ei``, then the T traversals'
    segment ids; ``floats`` = its ``wf``, ``ef``, then the traversals' entry times, exit times and
    fractions (T each). ``estop`` is -1 when the recursion stopped early (nothing emitted).
    """
    stop, S, M, nk, E, wi, wf, ei, ef = viterbi_run(
        w_ts, w_seq, w_ptr, w_seg, w_off, w_bp, w_scores, sc, p_ts, p_x, p_y, p_sigma, c_ptr, c_seg, c_off,
        c_emis, i0, pre_trans, finish, status, length_m, reverse_of, row_ptr, col, gap_m, cf)
    if stop == len(p_ts):
        estop, why, ids, times = emit_traversals_packed(
            ei[:E], ei[2 * E:], ef[:E], ef[E:], 0, ot, 4 * E + 64, segment_ids, length_m, reverse_of, row_ptr, col,
            gap_m, pred, uturn_penalty_m, min_cover_m)
    else:
        estop = -1
        why = 0
        ids = np.empty(0, np.int64)
        times = np.empty((3, 0), np.float64)
    T = len(ids)
    ni = len(wi) + len(ei)
    ints = np.empty(ni + T, np.int64)
    ints[:len(wi)] = wi
    ints[len(wi):ni] = ei
    ints[ni:] = ids
    nf = len(wf) + len(ef)
    floats = np.empty(nf + 3 * T, np.float64)
    floats[:len(wf)] = wf
    floats[len(wf):nf] = ef
    for r in range(3):
        floats[nf + r * T:nf + (r + 1) * T] = times[r]
    return stop, S, M, nk, E, estop, why, T, ints, floats
