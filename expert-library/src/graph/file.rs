//! A graph on disk, all little-endian:
//!
//! ```text
//! "ROEHNSW1"  dim u64  M u64  nodes u64  entry node u64 (u64::MAX: none)  top level u64
//! row of each node        nodes x u32
//! level of each node      nodes x u8
//! each node's vector and level-0 list: (vector words + 1 + 2M) x u32
//! each node above level 0, in node order, its upper lists: level x (1 + M) x u32
//! ```
//!
//! Loading checks everything a search relies on for memory safety and termination (every
//! link names a node, and on an upper level a node that has a list there; no count exceeds
//! its list; the entry point is on the top level; rows are distinct and below the index's
//! row count; vector padding is zero); that the vectors are the index's own is the
//! caller's check, and that the bytes are the ones written is the checksum's.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use super::{kernels, Graph, Top, MAX_LEVEL, NONE};
use crate::index::IndexConfig;

const MAGIC: &[u8; 8] = b"ROEHNSW1";
const HEADER: u64 = 8 + 5 * 8;

pub(super) fn save(g: &Graph, path: &Path) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let top = *g.top.lock();
    let entry = if top.node == NONE {
        u64::MAX
    } else {
        top.node as u64
    };
    out.write_all(MAGIC)?;
    let n = g.size() as u32;
    for x in [g.dim as u64, g.m as u64, n as u64, entry, top.level as u64] {
        out.write_all(&x.to_le_bytes())?;
    }
    for node in 0..n {
        out.write_all(&g.row_of_node(node).to_le_bytes())?;
    }
    for node in 0..n {
        out.write_all(&[g.level(node) as u8])?;
    }
    let words = g.vec_words + 1 + g.m0;
    let mut buf = Vec::with_capacity(4 * words);
    for node in 0..n {
        buf.clear();
        // SAFETY: the node exists; its block holds `words` words and more.
        let block = unsafe { std::slice::from_raw_parts(g.block(node), words) };
        for w in block {
            buf.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        out.write_all(&buf)?;
    }
    for node in 0..n {
        if let Some(lists) = g.chunk(node).upper[Graph::slot(node)].get() {
            for w in lists.iter() {
                out.write_all(&w.load(Ordering::Relaxed).to_le_bytes())?;
            }
        }
    }
    out.into_inner().map_err(|e| e.into_error())?;
    Ok(())
}

fn read_u64(input: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    input.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_words(input: &mut impl Read, out: &mut [u32], buf: &mut Vec<u8>) -> std::io::Result<()> {
    buf.resize(4 * out.len(), 0);
    input.read_exact(buf)?;
    for (w, b) in out.iter_mut().zip(buf.chunks_exact(4)) {
        *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    Ok(())
}

/// `links` (a count, then room for `cap` links) is a list of nodes below `n`.
fn check_list(words: &[u32], cap: usize, n: usize) -> Result<(), String> {
    let count = words[0] as usize;
    if count > cap {
        return Err(format!("a list of {count} links, at most {cap} fit"));
    }
    match words[1..=count].iter().find(|x| **x as usize >= n) {
        Some(x) => Err(format!("a link to node {x} of {n}")),
        None => Ok(()),
    }
}

pub(super) fn load(
    path: &Path,
    dim: usize,
    config: &IndexConfig,
    row_limit: usize,
) -> Result<Graph, String> {
    let io = |e: std::io::Error| format!("reading {}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut input = BufReader::with_capacity(1 << 20, file);
    let mut magic = [0u8; 8];
    input.read_exact(&mut magic).map_err(io)?;
    if &magic != MAGIC {
        return Err("not a roe graph file".into());
    }
    let mut header = [0u64; 5];
    for h in &mut header {
        *h = read_u64(&mut input).map_err(io)?;
    }
    let [file_dim, m, n, entry, top_level] = header;
    if file_dim != dim as u64 {
        return Err(format!("a {file_dim}-d graph, expected {dim}-d"));
    }
    if !(2..=1024).contains(&m) {
        return Err(format!("M={m}"));
    }
    if n >= NONE as u64 || top_level > MAX_LEVEL as u64 {
        return Err(format!("{n} nodes, top level {top_level}"));
    }
    let mut g = Graph::empty(dim, m as usize, config);
    let (n, m) = (n as usize, m as usize);
    let words = g.vec_words + 1 + g.m0;
    // The fixed part must fit in the file before anything that size is allocated.
    let fixed = (n as u64)
        .checked_mul(5 + 4 * words as u64)
        .and_then(|x| x.checked_add(HEADER));
    if fixed.is_none_or(|f| f > file_len) {
        return Err(format!("{n} nodes do not fit in {file_len} bytes"));
    }
    let mut buf = Vec::new();
    let mut rows = vec![0u32; n];
    read_words(&mut input, &mut rows, &mut buf).map_err(io)?;
    let mut levels = vec![0u8; n];
    input.read_exact(&mut levels).map_err(io)?;
    let upper_words: u64 = levels.iter().map(|l| *l as u64 * (1 + m as u64)).sum();
    let expected = fixed.unwrap_or(0) + 4 * upper_words;
    if expected != file_len {
        return Err(format!("{file_len} bytes, the header says {expected}"));
    }
    if let Some(l) = levels.iter().find(|l| **l as u64 > top_level) {
        return Err(format!(
            "a node on level {l} above the top level {top_level}"
        ));
    }
    // Rows are checked before the row map is sized from the largest of them.
    if let Some(r) = rows
        .iter()
        .find(|r| **r == NONE || **r as usize >= row_limit)
    {
        return Err(format!(
            "row {r} out of range: the index has {row_limit} rows"
        ));
    }
    let highest = rows.iter().max().map_or(0, |r| *r as usize + 1);
    let mut node_of = vec![NONE; highest];
    for (node, &r) in rows.iter().enumerate() {
        if node_of[r as usize] != NONE {
            return Err(format!("row {r} twice"));
        }
        node_of[r as usize] = node as u32;
    }
    g.grow_to(n)?;
    let mut words_buf = vec![0u32; words];
    let padding_from = dim.div_ceil(2);
    for node in 0..n as u32 {
        read_words(&mut input, &mut words_buf, &mut buf).map_err(io)?;
        check_list(&words_buf[g.vec_words..], g.m0, n)?;
        let odd_tail = dim % 2 == 1 && words_buf[dim / 2] >> 16 != 0;
        if odd_tail || words_buf[padding_from..g.vec_words].iter().any(|w| *w != 0) {
            return Err(format!("node {node}'s vector padding is not zero"));
        }
        let block = g.block(node);
        for (i, w) in words_buf.iter().enumerate() {
            // SAFETY: the block holds `words` words; the graph is not shared yet.
            unsafe { (*block.add(i)).store(*w, Ordering::Relaxed) };
        }
        let chunk = g.chunk(node);
        let slot = Graph::slot(node);
        chunk.rows[slot].store(rows[node as usize], Ordering::Relaxed);
        chunk.levels[slot].store(levels[node as usize], Ordering::Relaxed);
    }
    for (node, &level) in levels.iter().enumerate() {
        let mut lists = vec![0u32; level as usize * (1 + m)];
        read_words(&mut input, &mut lists, &mut buf).map_err(io)?;
        for (l, list) in lists.chunks_exact(1 + m).enumerate() {
            check_list(list, m, n)?;
            // A search reads a linked node's list on the same level: it must have one.
            let level = l + 1;
            if let Some(x) = list[1..=list[0] as usize]
                .iter()
                .find(|x| (levels[**x as usize] as usize) < level)
            {
                return Err(format!(
                    "a link on level {level} to node {x}, which is on level {} only",
                    levels[*x as usize]
                ));
            }
        }
        if level > 0 {
            let node = node as u32;
            let _ = g.chunk(node).upper[Graph::slot(node)]
                .set(lists.into_iter().map(AtomicU32::new).collect());
        }
    }
    let top = match entry {
        u64::MAX if n == 0 => Top {
            node: NONE,
            level: 0,
        },
        e if e < n as u64 && levels[e as usize] as u64 == top_level => Top {
            node: e as u32,
            level: top_level as usize,
        },
        e => {
            return Err(format!(
                "entry point {e} of {n} nodes, not on level {top_level}"
            ))
        }
    };
    *g.top.get_mut() = top;
    *g.node_of.get_mut() = node_of;
    *g.len.get_mut() = n;
    *g.complete_below.get_mut() = highest;
    debug_assert_eq!(kernels::vector_words(dim), g.vec_words);
    Ok(g)
}
