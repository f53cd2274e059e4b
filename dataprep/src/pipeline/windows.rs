//! Reading the corpus in windows: documents read, split between training and validation, and tokenised on the pool while the rest of the window is read.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;

use crate::input::DocumentReader;
use crate::instances::TokenizedDoc;
use crate::rng::derive_seed;
use crate::tasks::InOrder;
use crate::wordpiece::SentenceTokenizer;

use super::{DataprepConfig, MIN_WINDOW_DOCS, SALT_VALIDATION};

/// A window's documents, tokenised, in corpus order.
pub(super) struct Window {
    pub(super) index: u64,
    pub(super) first_doc: u64,
    pub(super) docs: Vec<TokenizedDoc>,
}

/// A document's sentences in one buffer: one allocation per document rather than one per
/// sentence, while it waits to be tokenised.
pub(super) struct RawDoc {
    pub(super) text: String,
    pub(super) ends: Vec<u32>,
}

impl RawDoc {
    pub(super) fn new(sentences: Vec<String>) -> RawDoc {
        let mut text = String::with_capacity(sentences.iter().map(String::len).sum());
        let mut ends = Vec::with_capacity(sentences.len());
        for s in &sentences {
            text.push_str(s);
            ends.push(text.len() as u32);
        }
        RawDoc { text, ends }
    }

    pub(super) fn sentences(&self) -> impl Iterator<Item = &str> {
        let starts = std::iter::once(0).chain(self.ends.iter().map(|&e| e as usize));
        starts
            .zip(self.ends.iter())
            .map(|(start, &end)| &self.text[start..end as usize])
    }
}

/// A window's documents, tokenised and split.
pub(super) struct WindowDocs {
    pub(super) index: u64,
    pub(super) train: Vec<TokenizedDoc>,
    pub(super) validation: Vec<TokenizedDoc>,
    pub(super) empty: u64,
}

/// Cuts the document stream into windows, tokenised as they are read.
pub(super) struct WindowReader {
    pub(super) reader: DocumentReader,
    pub(super) tokenizer: Arc<SentenceTokenizer>,
    pub(super) window_bytes: usize,
    pub(super) pieces: VecDeque<Vec<String>>,
    /// Documents read past the end of the last window, so that a tail too small to draw
    /// NotNext partners from can join that window instead of forming its own.
    pub(super) ahead: VecDeque<RawDoc>,
    pub(super) ended: bool,
    pub(super) index: u64,
    pub(super) first_doc: u64,
}

impl WindowReader {
    pub(super) fn new(
        files: Vec<PathBuf>,
        window_bytes: usize,
        tokenizer: Arc<SentenceTokenizer>,
    ) -> WindowReader {
        WindowReader {
            reader: DocumentReader::new(files, window_bytes),
            tokenizer,
            window_bytes,
            pieces: VecDeque::new(),
            ahead: VecDeque::new(),
            ended: false,
            index: 0,
            first_doc: 0,
        }
    }

    pub(super) fn read_document(&mut self) -> Result<Option<RawDoc>> {
        let doc = self.reader.next_document(&mut self.pieces)?;
        self.ended = doc.is_none();
        Ok(doc.map(RawDoc::new))
    }

    pub(super) fn next_window(&mut self) -> Result<Option<Window>> {
        let mut docs = TokenizingDocs::new(Arc::clone(&self.tokenizer));
        let mut bytes = 0;
        while bytes < self.window_bytes {
            let doc = match self.ahead.pop_front() {
                Some(d) => d,
                None if self.ended => break,
                None => match self.read_document()? {
                    Some(d) => d,
                    None => break,
                },
            };
            bytes += doc.text.len();
            docs.push(doc)?;
        }
        while !self.ended && self.ahead.len() < MIN_WINDOW_DOCS {
            if let Some(d) = self.read_document()? {
                self.ahead.push_back(d);
            }
        }
        if self.ended && self.ahead.len() < MIN_WINDOW_DOCS {
            while let Some(d) = self.ahead.pop_front() {
                docs.push(d)?;
            }
        }
        let docs = docs.finish()?;
        if docs.is_empty() {
            return Ok(None);
        }
        let window = Window {
            index: self.index,
            first_doc: self.first_doc,
            docs,
        };
        self.index += 1;
        self.first_doc += window.docs.len() as u64;
        Ok(Some(window))
    }
}

/// Text per batch of documents handed to the pool to tokenise.
pub(super) const TOKENIZE_BATCH_BYTES: usize = 64 << 10;

/// Tokenises documents on the pool while the reader goes on reading. Raw text is held only
/// for the batches still pending (at most [`crate::tasks::max_pending`]), not for a whole
/// window.
pub(super) struct TokenizingDocs {
    pub(super) tokenizer: Arc<SentenceTokenizer>,
    pub(super) batch: Vec<RawDoc>,
    pub(super) batch_bytes: usize,
    pub(super) pending: InOrder<Vec<TokenizedDoc>>,
    pub(super) done: Vec<TokenizedDoc>,
}

impl TokenizingDocs {
    pub(super) fn new(tokenizer: Arc<SentenceTokenizer>) -> TokenizingDocs {
        TokenizingDocs {
            tokenizer,
            batch: Vec::new(),
            batch_bytes: 0,
            pending: InOrder::new(),
            done: Vec::new(),
        }
    }

    pub(super) fn push(&mut self, doc: RawDoc) -> Result<()> {
        self.batch_bytes += doc.text.len();
        self.batch.push(doc);
        if self.batch_bytes >= TOKENIZE_BATCH_BYTES {
            self.send_batch()?;
        }
        Ok(())
    }

    pub(super) fn send_batch(&mut self) -> Result<()> {
        while let Some(docs) = self.pending.make_room()? {
            self.done.extend(docs);
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let tokenizer = Arc::clone(&self.tokenizer);
        self.pending.spawn(move || {
            batch
                .iter()
                .map(|d| tokenize_document(&tokenizer, d))
                .collect()
        });
        Ok(())
    }

    /// The documents pushed, tokenised, in order.
    pub(super) fn finish(mut self) -> Result<Vec<TokenizedDoc>> {
        if !self.batch.is_empty() {
            self.send_batch()?;
        }
        while let Some(docs) = self.pending.oldest()? {
            self.done.extend(docs);
        }
        Ok(self.done)
    }
}

pub(super) fn is_validation(seed: u64, doc: u64, fraction: f64) -> bool {
    fraction > 0.0
        && ((derive_seed(&[seed, doc, SALT_VALIDATION]) >> 11) as f64 / (1u64 << 53) as f64)
            < fraction
}

pub(super) fn tokenize_document(
    tokenizer: &SentenceTokenizer,
    raw: &RawDoc,
) -> Result<TokenizedDoc> {
    let mut doc = TokenizedDoc::default();
    let mut ids = Vec::with_capacity(64);
    for s in raw.sentences() {
        ids.clear();
        tokenizer.encode(s, &mut ids)?;
        doc.push_sentence(&ids);
    }
    Ok(doc)
}

/// Splits a window's documents into training and validation, dropping empty ones.
pub(super) fn split_window(w: Window, cfg: &DataprepConfig) -> WindowDocs {
    let mut out = WindowDocs {
        index: w.index,
        train: Vec::new(),
        validation: Vec::new(),
        empty: 0,
    };
    for (i, doc) in w.docs.into_iter().enumerate() {
        if doc.sentences() == 0 {
            out.empty += 1;
        } else if is_validation(
            cfg.options.seed,
            w.first_doc + i as u64,
            cfg.options.validation_fraction,
        ) {
            out.validation.push(doc);
        } else {
            out.train.push(doc);
        }
    }
    out
}
