//! Fenced blocks of the Markdown files, and the rules they follow: each
//! has an info string saying what it is, so none is left out unnoticed.

use std::path::Path;

/// A fenced block.
#[derive(Debug, Clone)]
pub struct Block {
    /// The file, relative to the repository.
    pub file: String,
    /// Line of the opening fence (1-based).
    pub line: usize,
    /// The info string, e.g. `sh` or `sh no-test` or `json schema=MailRequest`.
    pub info: String,
    /// The lines between the fences, each ending with a newline.
    pub text: String,
}

impl Block {
    /// The first word of the info string.
    pub fn language(&self) -> &str {
        self.info.split_whitespace().next().unwrap_or("")
    }

    /// The words after the first.
    pub fn attributes(&self) -> Vec<&str> {
        self.info.split_whitespace().skip(1).collect()
    }

    /// Where it is, for messages.
    pub fn place(&self) -> String {
        format!("{}:{}", self.file, self.line)
    }
}

/// Every fenced block of `file` (relative to the repository root).
pub fn blocks(root: &Path, file: &str) -> Vec<Block> {
    let text = std::fs::read_to_string(root.join(file)).unwrap();
    let mut blocks = Vec::new();
    let mut open: Option<Block> = None;
    for (index, line) in text.lines().enumerate() {
        let fence = line.trim_start();
        if let Some(info) = fence.strip_prefix("```") {
            assert_eq!(
                fence.len(),
                line.len(),
                "{file}:{}: an indented fence (the docs test reads top-level fences only)",
                index + 1
            );
            match open.take() {
                Some(block) => {
                    assert!(
                        info.trim().is_empty(),
                        "{file}:{}: a fence inside a block",
                        index + 1
                    );
                    blocks.push(block);
                }
                None => {
                    open = Some(Block {
                        file: file.to_string(),
                        line: index + 1,
                        info: info.trim().to_string(),
                        text: String::new(),
                    })
                }
            }
        } else if let Some(block) = open.as_mut() {
            block.text.push_str(line);
            block.text.push('\n');
        }
    }
    assert!(open.is_none(), "{file}: a block is not closed");
    blocks
}

/// The Markdown files whose blocks are checked: the README and docs/*.md.
pub fn files(root: &Path) -> Vec<String> {
    let mut files = vec!["README.md".to_string()];
    let mut docs: Vec<String> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".md"))
        .map(|name| format!("docs/{name}"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// Relative links `[text](target)` of a Markdown text (not in code blocks
/// or code spans), without their `#fragment`.
pub fn relative_links(text: &str) -> Vec<(usize, String)> {
    let mut links = Vec::new();
    let mut in_block = false;
    for (index, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            continue;
        }
        // Code spans may hold `](`; leave them out.
        let mut outside = String::new();
        for (part, piece) in line.split('`').enumerate() {
            if part % 2 == 0 {
                outside.push_str(piece);
            }
        }
        let mut rest = outside.as_str();
        while let Some(start) = rest.find("](") {
            let after = &rest[start + 2..];
            let Some(end) = after.find(')') else { break };
            let target = &after[..end];
            let target = target.split('#').next().unwrap_or("");
            if !target.is_empty() && !target.contains("://") && !target.starts_with("mailto:") {
                links.push((index + 1, target.to_string()));
            }
            rest = &after[end..];
        }
    }
    links
}
