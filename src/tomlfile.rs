//! The one loader of fledge's TOML files (`fledge.toml`, `manifest.toml`): parse with
//! `line:column` positions, check every key against the file's known keys (naming the table
//! and the nearest known key), then deserialize into the typed structs. Each file's module
//! turns a [`TomlProblem`] into its own error type, with its own path and hint.

use serde::de::DeserializeOwned;

/// The keys a table may hold.
#[derive(Debug)]
pub enum Keys {
    /// Any keys and values (free-form maps such as `labels` or `env`).
    Any,
    /// These keys, each with what its value may hold (values that are not tables are not
    /// looked into).
    Table(&'static [(&'static str, Keys)]),
    /// A map from any name to tables of this shape (`[actions.NAME]`).
    MapOf(&'static Keys),
    /// An array of tables of this shape (`[[disks]]`).
    ArrayOf(&'static Keys),
    /// The same as another table's keys (a shape used in several places).
    Shape(&'static Keys),
}

/// What is wrong with a TOML text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TomlProblem {
    /// Bad syntax, or a value of the wrong type (1-based line and column, in characters).
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
    /// A key the table does not know.
    UnknownKey {
        key: String,
        /// `[filesystem]`, `[actions.NAME]`, `[[disks]]` or `the top-level table`.
        table: String,
        suggestion: Option<String>,
    },
}

/// Parse `text`, check its keys against `keys`, and deserialize it.
pub fn parse<T: DeserializeOwned>(text: &str, keys: &Keys) -> Result<T, TomlProblem> {
    let syntax = |e: toml::de::Error| {
        let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        TomlProblem::Syntax {
            line,
            column,
            message: e.message().trim().replace('\n', " "),
        }
    };
    let table: toml::Table = toml::from_str(text).map_err(syntax)?;
    check(&toml::Value::Table(table), keys, None)?;
    toml::from_str(text).map_err(syntax)
}

/// Check `value` against `keys`; `label` names the table `value` is (None: the top level).
fn check(value: &toml::Value, keys: &Keys, label: Option<&str>) -> Result<(), TomlProblem> {
    match (keys, value) {
        (Keys::Shape(inner), _) => check(value, inner, label),
        (Keys::Table(known), toml::Value::Table(t)) => {
            for (key, v) in t {
                let Some((_, inner)) = known.iter().find(|(k, _)| k == key) else {
                    let names: Vec<&str> = known.iter().map(|(k, _)| *k).collect();
                    return Err(TomlProblem::UnknownKey {
                        key: key.clone(),
                        table: match label {
                            Some(l) => format!("[{l}]"),
                            None => "the top-level table".into(),
                        },
                        suggestion: nearest(key, &names).map(str::to_owned),
                    });
                };
                let child = match label {
                    Some(l) => format!("{l}.{key}"),
                    None => key.clone(),
                };
                check(v, inner, Some(&child))?;
            }
            Ok(())
        }
        (Keys::MapOf(inner), toml::Value::Table(t)) => {
            for (name, v) in t {
                let child = format!("{}.{name}", label.unwrap_or_default());
                check(v, inner, Some(&child))?;
            }
            Ok(())
        }
        (Keys::ArrayOf(inner), toml::Value::Array(items)) => {
            let child = format!("[{}]", label.unwrap_or_default());
            items.iter().try_for_each(|v| check(v, inner, Some(&child)))
        }
        // Free-form, or a value of another type: deserializing reports a wrong type with
        // its position.
        _ => Ok(()),
    }
}

/// The known key closest to `key` by edit distance, when the distance is small.
fn nearest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    let limit = if key.chars().count() <= 3 { 1 } else { 2 };
    known
        .iter()
        .map(|k| (levenshtein(key, k), *k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = before
        .get(line_start..)
        .map(|s| s.chars().count())
        .unwrap_or(0)
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    static DOC: Keys = Keys::Table(&[("inline", Keys::Any), ("path", Keys::Any)]);
    static ITEM: Keys = Keys::Table(&[("name", Keys::Any), ("format", Keys::Any)]);
    static ACTION: Keys = Keys::Table(&[("method", Keys::Any), ("path", Keys::Any)]);
    static TOP: Keys = Keys::Table(&[
        ("version", Keys::Any),
        ("labels", Keys::Any),
        (
            "cloud",
            Keys::Table(&[("user_data", Keys::Table(&[])), ("meta", Keys::Shape(&DOC))]),
        ),
        ("doc", Keys::MapOf(&DOC)),
        ("actions", Keys::MapOf(&ACTION)),
        ("disks", Keys::ArrayOf(&ITEM)),
    ]);

    fn problem(text: &str) -> Option<TomlProblem> {
        parse::<toml::Table>(text, &TOP).err()
    }

    fn unknown(key: &str, table: &str, suggestion: Option<&str>) -> Option<TomlProblem> {
        Some(TomlProblem::UnknownKey {
            key: key.into(),
            table: table.into(),
            suggestion: suggestion.map(str::to_owned),
        })
    }

    #[test]
    fn unknown_keys_are_named_with_their_table_and_nearest_key() {
        let cases = [
            ("version = 1\n", None),
            ("[labels]\nanything = \"goes\"\n", None),
            (
                "versio = 1\n",
                unknown("versio", "the top-level table", Some("version")),
            ),
            ("zzz = 1\n", unknown("zzz", "the top-level table", None)),
            (
                "[cloud]\nuser_dat = {}\n",
                unknown("user_dat", "[cloud]", Some("user_data")),
            ),
            (
                "[cloud.user_data]\nx = 1\n",
                unknown("x", "[cloud.user_data]", None),
            ),
            (
                "[actions.restart]\nmethod = \"POST\"\npaht = \"/r\"\n",
                unknown("paht", "[actions.restart]", Some("path")),
            ),
            (
                "[[disks]]\nname = \"a\"\n[[disks]]\nnmae = \"b\"\n",
                unknown("nmae", "[[disks]]", Some("name")),
            ),
            ("[doc.a]\ninline = true\n", None),
            (
                "[cloud.meta]\npaths = 1\n",
                unknown("paths", "[cloud.meta]", Some("path")),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(problem(text), want, "{text}");
        }
    }

    #[test]
    fn syntax_errors_have_line_and_column() {
        match problem("version = 1\n[cloud\n") {
            Some(TomlProblem::Syntax {
                line,
                column,
                message,
            }) => {
                assert_eq!((line, column), (2, 7), "{message}");
                assert!(!message.contains('\n'));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn distances_and_positions() {
        for (a, b, d) in [
            ("", "", 0),
            ("abc", "", 3),
            ("preallocat", "preallocate", 1),
            ("kitten", "sitting", 3),
            ("type", "tpye", 2),
        ] {
            assert_eq!(levenshtein(a, b), d, "{a} {b}");
        }
        let t = "ab\nçd\nx";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 3), (2, 1));
        assert_eq!(line_col(t, 5), (2, 2)); // 'ç' is two bytes
        assert_eq!(line_col(t, 100), (3, 2));
    }
}
