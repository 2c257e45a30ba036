//! Chat templates: the Jinja template a model ships with, rendered by
//! minijinja (with Python-compatible string methods).

use crate::error::{Error, Result};
use serde::Serialize;

#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A writer that refuses to grow past `left` more bytes.
struct Capped {
    out: Vec<u8>,
    left: usize,
    hit: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if b.len() > self.left {
            self.hit = true;
            return Err(std::io::Error::other("output limit"));
        }
        self.left -= b.len();
        self.out.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Render `messages` with `template`; `add_generation_prompt` opens the
/// assistant's turn. A template is code from the model file, so rendering
/// is bounded: by fuel (minijinja's instruction budget: 100,000 plus 10,000
/// a message, far above what real chat templates use) and by output size
/// (1 MiB plus twice the messages' bytes).
pub fn render(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos: &str,
    eos: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    let fuel = 100_000 + 10_000 * messages.len() as u64;
    env.set_fuel(Some(fuel));
    let limit = (1 << 20)
        + 2 * messages
            .iter()
            .map(|m| m.content.len() + m.role.len())
            .sum::<usize>();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_template("chat", template)
        .map_err(|e| Error::msg(format!("chat template: {e}")))?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| Error::msg(format!("chat template: {e}")))?;
    let mut w = Capped {
        out: vec![],
        left: limit,
        hit: false,
    };
    let ctx = minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos,
        eos_token => eos,
    };
    let rendered = tmpl.render_captured_to(ctx, &mut w).map(|_| ());
    match rendered {
        Ok(()) => String::from_utf8(w.out)
            .map_err(|_| Error::msg("chat template: the output is not UTF-8")),
        Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => Err(Error::msg(format!(
            "chat template: rendering ran out of its budget of {fuel} steps (a template that loops without end?)"
        ))),
        Err(_) if w.hit => Err(Error::msg(format!(
            "chat template: the rendered prompt exceeds {limit} bytes"
        ))),
        Err(e) => Err(Error::msg(format!("chat template: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    fn msgs(n: usize) -> Vec<Message> {
        (0..n)
            .map(|i| Message {
                role: if i % 2 == 0 { "user" } else { "assistant" }.into(),
                content: format!("message {i}"),
            })
            .collect()
    }

    #[test]
    fn real_templates_render_within_the_bounds() {
        // a long conversation stays well inside the fuel and output budget
        let out = render(CHATML, &msgs(500), true, "", "").unwrap();
        assert!(out.starts_with("<|im_start|>user\nmessage 0<|im_end|>\n"));
        assert!(out.ends_with("<|im_start|>assistant\n"));
        assert_eq!(out.matches("<|im_end|>").count(), 500);
    }

    #[test]
    fn templates_that_never_end_or_explode_are_stopped() {
        // nested loops: 10^8 steps
        let t =
            "{% for a in range(10000) %}{% for b in range(10000) %}{{ a }}{% endfor %}{% endfor %}";
        let e = render(t, &msgs(2), true, "", "").unwrap_err().to_string();
        assert!(e.contains("chat template") && e.contains("budget"), "{e}");
        // a few steps that print a lot
        let t = "{% for a in range(20) %}{{ 'x' * 1000000 }}{% endfor %}";
        let e = render(t, &msgs(2), true, "", "").unwrap_err().to_string();
        assert!(e.contains("chat template") && e.contains("exceeds"), "{e}");
    }
}
