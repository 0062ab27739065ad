//! Walks the loaded configuration tree one table at a time, remembering which keys were read so
//! that anything else is reported as unknown, and collecting every problem with its full key.

use regex::Regex;
use serde_json::{Map, Value};

use super::Problem;

pub(super) struct Section<'a> {
    table: Option<&'a Map<String, Value>>,
    path: String,
    problems: &'a mut Vec<Problem>,
    known: Vec<String>,
}

impl<'a> Section<'a> {
    pub(super) fn root(tree: &'a Value, problems: &'a mut Vec<Problem>) -> Self {
        Section { table: tree.as_object(), path: String::new(), problems, known: Vec::new() }
    }

    fn key(&self, key: &str) -> String {
        match (self.path.is_empty(), key.is_empty()) {
            (true, _) => key.to_string(),
            // The table itself.
            (false, true) => self.path.clone(),
            (false, false) => format!("{}.{key}", self.path),
        }
    }

    /// Whether the table is in the file at all.
    pub(super) fn present(&self) -> bool {
        self.table.is_some()
    }

    fn get(&mut self, key: &str) -> Option<&'a Value> {
        self.known.push(key.to_string());
        self.table.and_then(|t| t.get(key)).filter(|v| !v.is_null())
    }

    pub(super) fn problem(&mut self, key: &str, message: impl Into<String>) {
        let key = self.key(key);
        self.problems.push(Problem { key, message: message.into() });
    }

    /// Reports every key of this table that no getter asked for.
    pub(super) fn finish(self) {
        let Some(table) = self.table else { return };
        for key in table.keys().filter(|k| !self.known.contains(k)) {
            let key = if self.path.is_empty() { key.clone() } else { format!("{}.{key}", self.path) };
            self.problems.push(Problem { key, message: "unknown key".into() });
        }
    }

    /// A sub-table; a missing one reads as empty so that its defaults (and required keys) apply.
    pub(super) fn section<T>(&mut self, key: &str, read: impl FnOnce(&mut Section<'_>) -> T) -> Option<T> {
        let table = match self.get(key) {
            None => None,
            Some(Value::Object(map)) => Some(map),
            Some(_) => {
                self.problem(key, "must be a table");
                return None;
            }
        };
        let mut child = Section { table, path: self.key(key), problems: &mut *self.problems, known: Vec::new() };
        let out = read(&mut child);
        child.finish();
        Some(out)
    }

    /// An array of tables (`[[key]]`); `None` when any entry is unusable.
    pub(super) fn array<T>(
        &mut self,
        key: &str,
        mut read: impl FnMut(&mut Section<'_>) -> Option<T>,
    ) -> Option<Vec<T>> {
        let items = match self.get(key) {
            None => return Some(Vec::new()),
            Some(Value::Array(items)) => items,
            Some(_) => {
                self.problem(key, "must be an array of tables ([[...]])");
                return None;
            }
        };
        let mut out = Vec::with_capacity(items.len());
        let mut complete = true;
        for (index, item) in items.iter().enumerate() {
            let path = format!("{}[{index}]", self.key(key));
            let Some(table) = item.as_object() else {
                self.problems.push(Problem { key: path, message: "must be a table".into() });
                complete = false;
                continue;
            };
            let mut child = Section { table: Some(table), path, problems: &mut *self.problems, known: Vec::new() };
            let value = read(&mut child);
            child.finish();
            match value {
                Some(v) => out.push(v),
                None => complete = false,
            }
        }
        complete.then_some(out)
    }

    /// A scalar as text (numbers and booleans are accepted, since environment overrides are text).
    /// The value of `key` as it stands, for what the other getters do not read.
    pub(super) fn raw(&mut self, key: &str) -> Option<&'a Value> {
        self.get(key)
    }

    pub(super) fn string(&mut self, key: &str) -> Option<String> {
        match self.get(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => {
                self.problem(key, "must be a single value, not a table or an array");
                None
            }
        }
    }

    pub(super) fn required_string(&mut self, key: &str) -> Option<String> {
        match self.string(key) {
            Some(s) if !s.trim().is_empty() => Some(s),
            Some(_) => {
                self.problem(key, "must not be empty");
                None
            }
            None => {
                if self.table.and_then(|t| t.get(key)).is_none() {
                    self.problem(key, "is required");
                }
                None
            }
        }
    }

    /// A value parsed by `parse`, or `default` (also parsed) when the key is missing.
    pub(super) fn parsed<T>(
        &mut self,
        key: &str,
        default: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let text = self.string(key).unwrap_or_else(|| default.to_string());
        parse(&text).map_err(|message| self.problem(key, message)).ok()
    }

    /// An optional value parsed by `parse`; `None` when missing or wrong (the latter is reported).
    pub(super) fn parsed_opt<T>(&mut self, key: &str, parse: impl FnOnce(&str) -> Result<T, String>) -> Option<T> {
        let text = self.string(key)?;
        parse(&text).map_err(|message| self.problem(key, message)).ok()
    }

    pub(super) fn duration(&mut self, key: &str, default: &str) -> Option<std::time::Duration> {
        self.parsed(key, default, super::units::parse_duration)
    }

    pub(super) fn required_regex(&mut self, key: &str) -> Option<Regex> {
        let text = self.required_string(key)?;
        compile(&text).map_err(|message| self.problem(key, message)).ok()
    }

    pub(super) fn regex_list(&mut self, key: &str) -> Option<Vec<Regex>> {
        let items = match self.get(key) {
            None => return Some(Vec::new()),
            Some(Value::Array(items)) => items,
            Some(Value::String(s)) => return compile(s).map(|r| vec![r]).map_err(|m| self.problem(key, m)).ok(),
            Some(_) => {
                self.problem(key, "must be an array of regular expressions");
                return None;
            }
        };
        let mut out = Vec::new();
        let mut complete = true;
        for (index, item) in items.iter().enumerate() {
            let compiled = item.as_str().ok_or_else(|| "must be a string".to_string()).and_then(compile);
            match compiled {
                Ok(re) => out.push(re),
                Err(message) => {
                    let key = format!("{key}[{index}]");
                    self.problem(&key, message);
                    complete = false;
                }
            }
        }
        complete.then_some(out)
    }
}

impl Section<'_> {
    /// A list of strings; empty when missing.
    pub(super) fn string_list(&mut self, key: &str) -> Option<Vec<String>> {
        let items = match self.get(key) {
            None => return Some(Vec::new()),
            Some(Value::Array(items)) => items,
            Some(_) => {
                self.problem(key, "must be an array of strings");
                return None;
            }
        };
        let mut out = Vec::new();
        let mut complete = true;
        for (index, item) in items.iter().enumerate() {
            match item.as_str() {
                Some(text) => out.push(text.to_string()),
                None => {
                    self.problem(&format!("{key}[{index}]"), "must be a string");
                    complete = false;
                }
            }
        }
        complete.then_some(out)
    }

    /// A table of text values (`tags = { team = "search" }`); empty when missing.
    pub(super) fn string_map(&mut self, key: &str) -> Option<std::collections::BTreeMap<String, String>> {
        let table = match self.get(key) {
            None => return Some(Default::default()),
            Some(Value::Object(table)) => table,
            Some(_) => {
                self.problem(key, "must be a table of names to values, like { team = \"search\" }");
                return None;
            }
        };
        let mut out = std::collections::BTreeMap::new();
        let mut complete = true;
        for (name, value) in table {
            let text = match value {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => {
                    self.problem(&format!("{key}.{name}"), "must be a single value");
                    complete = false;
                    continue;
                }
            };
            out.insert(name.clone(), text);
        }
        complete.then_some(out)
    }
}

fn compile(text: &str) -> Result<Regex, String> {
    Regex::new(text).map_err(|e| format!("`{text}` is not a valid regular expression: {e}"))
}
