//! A lexical view of a set of texts, beside the dense one. Look-alike tasks often share their
//! source texts and differ in *format*: a `Category:` line, a `Paragraph- Sent 1:` layout, the
//! answer labels. A sentence encoder all but ignores such markers; term statistics do not.
//!
//! An expert's profile is the fraction of its instances that contain each term. A set of
//! queries gets a profile the same way, and the two are compared by cosine, with terms
//! weighted by how few experts use them (IDF over experts), so markers every task shares
//! count for little. Profiles add up instance by instance: adding an expert retrains nothing.

use std::collections::HashMap;
use std::sync::Arc;

/// Terms of one instance: those of its text ([`text_terms`]) and its answer labels.
pub fn terms(input: &str, choices: &[String]) -> Vec<String> {
    let mut out = text_terms(input);
    for c in choices {
        out.push(format!("@choice:{}", c.trim().to_lowercase()));
    }
    if choices.is_empty() {
        out.push("@choice:none".to_string());
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Lower-cased words, word bigrams and line-leading markers of a text, deduplicated.
pub fn text_terms(input: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in input.lines() {
        let words: Vec<String> = line
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(|w| w.to_lowercase())
            .collect();
        // The first token of a line, punctuation kept, marks its role ("question:", "category:").
        if let Some(head) = line.split_whitespace().next() {
            out.push(format!("^{}", head.to_lowercase()));
        }
        for w in &words {
            out.push(w.clone());
        }
        // Tokens that carry punctuation are layout: "(A)", "Answer:", "_", "Sent 12:".
        // Digits fold to 0 so that numbering matches across texts.
        for raw in line.split_whitespace() {
            if raw.chars().any(|c| c.is_ascii_punctuation()) && raw.chars().count() <= 12 {
                let shape: String = raw
                    .to_lowercase()
                    .chars()
                    .map(|c| if c.is_ascii_digit() { '0' } else { c })
                    .collect();
                out.push(format!("~{shape}"));
            }
        }
        for pair in words.windows(2) {
            out.push(format!("{} {}", pair[0], pair[1]));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Term -> number of texts that contain it, plus how many texts were counted.
#[derive(Debug, Clone, Default)]
pub struct TermProfile {
    pub counts: HashMap<String, u32>,
    pub texts: u32,
}

impl TermProfile {
    pub fn add(&mut self, input: &str, choices: &[String]) {
        self.add_terms(terms(input, choices));
    }

    /// Counts one text's (deduplicated) terms.
    pub fn add_terms(&mut self, terms: Vec<String>) {
        for t in terms {
            *self.counts.entry(t).or_insert(0) += 1;
        }
        self.texts += 1;
    }

    fn rate(&self, term: &str) -> f32 {
        match self.counts.get(term) {
            Some(&c) if self.texts > 0 => c as f32 / self.texts as f32,
            _ => 0.0,
        }
    }
}

/// Profiles of all experts and, per term, how many experts use it.
#[derive(Debug, Clone, Default)]
pub struct LexicalIndex {
    /// Shared, so that a copy to change off the routing lock (see
    /// `retrieval::RoutingState::lexical_after`) does not copy every profile.
    profiles: HashMap<String, Arc<TermProfile>>,
    expert_freq: HashMap<String, u32>,
    norms: HashMap<String, f32>,
    /// Built by [`Self::refresh`], dropped by any change: which experts use each term.
    postings: Option<Arc<Postings>>,
}

/// The profiles turned inside out, so that a query set's similarities cost one lookup per
/// query term instead of one per (expert, term).
#[derive(Debug, Clone)]
struct Postings {
    experts: Vec<String>,
    /// `norms[e]` is the norm of `experts[e]`'s profile.
    norms: Vec<f32>,
    /// Term -> its IDF and, per expert using it, (expert, rate).
    terms: HashMap<String, (f32, Vec<(u32, f32)>)>,
}

impl LexicalIndex {
    pub fn set_profile(&mut self, expert: &str, profile: TermProfile) {
        self.remove_expert(expert);
        for t in profile.counts.keys() {
            *self.expert_freq.entry(t.clone()).or_insert(0) += 1;
        }
        self.profiles.insert(expert.to_string(), Arc::new(profile));
        self.norms.clear();
        self.postings = None;
    }

    pub fn profile(&self, expert: &str) -> Option<&TermProfile> {
        self.profiles.get(expert).map(Arc::as_ref)
    }

    pub fn remove_expert(&mut self, expert: &str) {
        if let Some(old) = self.profiles.remove(expert) {
            for t in old.counts.keys() {
                if let Some(f) = self.expert_freq.get_mut(t) {
                    *f -= 1;
                    if *f == 0 {
                        self.expert_freq.remove(t);
                    }
                }
            }
            self.norms.clear();
            self.postings = None;
        }
    }

    fn idf(&self, term: &str) -> f32 {
        let n = self.profiles.len() as f32;
        let df = *self.expert_freq.get(term).unwrap_or(&0) as f32;
        ((n + 1.0) / (df + 1.0)).ln()
    }

    fn norm(&self, p: &TermProfile) -> f32 {
        // Sorted terms: float sums in a fixed order make routing bit-for-bit repeatable.
        let mut terms: Vec<&String> = p.counts.keys().collect();
        terms.sort_unstable();
        terms
            .into_iter()
            .map(|t| {
                let w = p.rate(t) * self.idf(t);
                w * w
            })
            .sum::<f32>()
            .sqrt()
    }

    /// IDF-weighted cosine between the query set's profile and each expert's profile.
    pub fn similarities(&self, queries: &TermProfile) -> HashMap<&str, f32> {
        let qn = self.norm(queries);
        let mut qw: Vec<(&String, f32)> = queries
            .counts
            .keys()
            .map(|t| (t, queries.rate(t) * self.idf(t)))
            .filter(|(_, w)| *w > 0.0)
            .collect();
        qw.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let cosine = |dot: f32, en: f32| {
            if qn > 0.0 && en > 0.0 {
                dot / (qn * en)
            } else {
                0.0
            }
        };
        if let Some(post) = &self.postings {
            // Per expert, the same products added in the same (term) order as below, less
            // the zeros: the same sums, bit for bit.
            let mut dots = vec![0.0f32; post.experts.len()];
            for (t, w) in &qw {
                if let Some((idf, users)) = post.terms.get(*t) {
                    for &(e, rate) in users {
                        dots[e as usize] += w * rate * idf;
                    }
                }
            }
            return post
                .experts
                .iter()
                .zip(dots)
                .zip(&post.norms)
                .map(|((id, dot), en)| (id.as_str(), cosine(dot, *en)))
                .collect();
        }
        self.profiles
            .iter()
            .map(|(id, p)| {
                let en = self.norms.get(id).copied().unwrap_or_else(|| self.norm(p));
                let dot: f32 = qw.iter().map(|(t, w)| w * p.rate(t) * self.idf(t)).sum();
                (id.as_str(), cosine(dot, en))
            })
            .collect()
    }

    /// Caches every expert's norm and the postings; call after a batch of changes, before
    /// routing.
    pub fn refresh(&mut self) {
        let norms: HashMap<String, f32> = self
            .profiles
            .iter()
            .map(|(id, p)| (id.clone(), self.norm(p)))
            .collect();
        let mut experts: Vec<String> = self.profiles.keys().cloned().collect();
        experts.sort_unstable();
        let mut terms: HashMap<String, (f32, Vec<(u32, f32)>)> = self
            .expert_freq
            .keys()
            .map(|t| (t.clone(), (self.idf(t), Vec::new())))
            .collect();
        for (e, id) in experts.iter().enumerate() {
            let p = &self.profiles[id];
            for t in p.counts.keys() {
                if let Some((_, users)) = terms.get_mut(t) {
                    users.push((e as u32, p.rate(t)));
                }
            }
        }
        let post_norms = experts.iter().map(|id| norms[id]).collect();
        self.postings = Some(Arc::new(Postings {
            experts,
            norms: post_norms,
            terms,
        }));
        self.norms = norms;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_and_labels_become_terms() {
        let t = terms(
            "Sentence: a b.\nCategory: Event Duration.",
            &["Yes.".into()],
        );
        assert!(t.contains(&"^category:".to_string()));
        assert!(t.contains(&"event duration".to_string()));
        assert!(t.contains(&"@choice:yes.".to_string()));
        assert!(terms("x", &[]).contains(&"@choice:none".to_string()));
    }

    #[test]
    fn the_set_with_the_distinctive_marker_wins() {
        let mut lex = LexicalIndex::default();
        let mut a = TermProfile::default();
        let mut b = TermProfile::default();
        for i in 0..10 {
            a.add(&format!("Sentence: story {i}.\nQuestion: why {i}?"), &[]);
            b.add(
                &format!("Sentence: story {i}.\nQuestion: why {i}?\nCategory: Frequency."),
                &[],
            );
        }
        lex.set_profile("a", a);
        lex.set_profile("b", b);
        lex.refresh();
        let mut q = TermProfile::default();
        q.add(
            "Sentence: another story.\nQuestion: when?\nCategory: Frequency.",
            &[],
        );
        let s = lex.similarities(&q);
        assert!(s["b"] > s["a"], "{s:?}");
        // The postings (after refresh) and the profiles (before) give the same sums.
        let mut unrefreshed = lex.clone();
        unrefreshed.postings = None;
        unrefreshed.norms.clear();
        assert_eq!(unrefreshed.similarities(&q), s);
        lex.remove_expert("b");
        assert_eq!(lex.similarities(&q).len(), 1);
    }
}
