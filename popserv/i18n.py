"""
Languages of the human-readable response texts (RFC 6856 LANG).

Every text the server sends is an English template; a L{Language} turns it
into its own words, with plural forms done properly. Only the text after the
status indicator and response code is translated: nothing a client may parse
(counts in STAT, LIST, UIDL lines; response codes) ever changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Language", "LANGUAGES", "DEFAULT_LANGUAGE", "negotiate"]


@dataclass(frozen=True)
class Language:
    """
    @ivar tag: the RFC 5646 language tag.
    @ivar description: the language's name, in that language (LANG listing).
    @ivar changed: the text of a successful C{LANG} reply.
    @ivar catalog: the translation of each English template.
    @ivar nouns: the forms of each counted noun (L{count}).
    @ivar source: the templates are written in this language (English): it
        needs no catalog.
    """

    tag: str
    description: str
    changed: str
    catalog: dict[str, str] = field(default_factory=dict, repr=False)
    nouns: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)
    source: bool = False

    def translates(self, template: str) -> bool:
        """Does this language have its own words for C{template}?"""
        return self.source or template in self.catalog

    def text(self, template: str, **params: Any) -> str:
        """The template in this language, with C{params} filled in."""
        return self.catalog.get(template, template).format(**params)

    def count(self, n: int, noun: str) -> str:
        """C{n} and the noun in the right plural form ("1 message", "5 messages")."""
        forms = self.nouns.get(noun)
        if forms is None:
            return f"{n} {noun}"
        return f"{n} {forms[self._pluralForm(n) if len(forms) > 2 else int(n != 1)]}"

    @staticmethod
    def _pluralForm(n: int) -> int:
        # Slavic rule (CLDR "one", "few", "many"): 1, 21, 31; 2-4, 22-24; the rest.
        if n % 10 == 1 and n % 100 != 11:
            return 0
        if 2 <= n % 10 <= 4 and not 12 <= n % 100 <= 14:
            return 1
        return 2


ENGLISH = Language(
    "en",
    "English",
    "Language changed",
    nouns={"message": ("message", "messages"), "octet": ("octet", "octets")},
    source=True,
)

RUSSIAN = Language(
    "ru",
    "Русский",
    "Язык изменён",
    catalog={
        "{implementation} ready.": "{implementation} готов.",
        "Send your password": "Отправьте пароль",
        "Logged in, {messages} ({octets})": "Вход выполнен: {messages} ({octets})",
        "Maildrop has {messages} ({octets})": "В ящике {messages} ({octets})",
        "{messages} ({octets})": "{messages} ({octets})",
        "{octets}": "{octets}",
        "Capability list follows": "Список возможностей",
        "Unique-ID listing follows": "Список уникальных идентификаторов",
        "Top of message follows": "Начало сообщения",
        "Message {number} deleted": "Сообщение {number} помечено к удалению",
        "{implementation} signing off ({messages} left)": "{implementation} завершает сеанс (осталось: {messages})",
        "{implementation} signing off": "{implementation} завершает сеанс",
        "Language listing follows": "Список языков",
        "Invalid language": "Неизвестный язык",
        "UTF-8 mode enabled": "Включён режим UTF-8",
        "Mechanism list follows": "Список механизмов",
        "Some deleted messages not removed": "Некоторые сообщения не удалось удалить",
        "Disconnected for inactivity": "Отключение из-за бездействия",
        "Server shutting down": "Сервер останавливается",
        "Too many connections, try again later": "Слишком много соединений, повторите позже",
        "Too many bad commands, closing connection": "Слишком много ошибочных команд, соединение закрывается",
        "Begin TLS negotiation": "Начинайте согласование TLS",
        "STLS is not available": "STLS недоступна",
        "TLS is already active": "TLS уже включён",
        # errors
        "Command failed": "Команда не выполнена",
        "No such message": "Нет такого сообщения",
        "Message is marked deleted": "Сообщение помечено к удалению",
        "Authentication failed": "Ошибка аутентификации",
        "Mailbox is locked by another session": "Ящик занят другим сеансом",
        "Temporary server failure, try again later": "Временный сбой сервера, повторите позже",
        "Permanent server failure": "Постоянный сбой сервера",
        "Mail server temporarily unavailable, try again later": (
            "Почтовый сервер временно недоступен, повторите позже"
        ),
        "This account is on another server: log in with USER/PASS or SASL PLAIN": (
            "Этот ящик на другом сервере: войдите с USER/PASS или SASL PLAIN"
        ),
        "Internal server error": "Внутренняя ошибка сервера",
        "Invalid user name": "Недопустимое имя пользователя",
        "Message was removed from the maildrop by another program": "Сообщение удалено из ящика другой программой",
        "Message is not a regular file": "Сообщение не является обычным файлом",
        "Mailbox does not exist": "Ящик не существует",
        "Account is disabled": "Учётная запись отключена",
        "Logged in too recently, wait {seconds} seconds": "Слишком частый вход, подождите {seconds} с",
        "Unknown command": "Неизвестная команда",
        "{verb} is not valid in this state": "{verb} недопустима в этом состоянии",
        "{verb} takes no arguments": "{verb} не принимает аргументов",
        "{verb} takes one message number": "{verb} принимает один номер сообщения",
        "{verb} takes at most one message number": "{verb} принимает не более одного номера сообщения",
        "Invalid message number": "Неверный номер сообщения",
        "TOP takes a message number and a line count": "TOP принимает номер сообщения и число строк",
        "Invalid line count": "Неверное число строк",
        "Invalid user name or password encoding": "Неверная кодировка имени или пароля",
        "Invalid argument": "Неверный аргумент",
        "PASS takes a password": "PASS принимает пароль",
        "APOP takes a user name and a digest": "APOP принимает имя и дайджест",
        "Invalid APOP digest": "Неверный дайджест APOP",
        "Send USER first": "Сначала отправьте USER",
        "APOP is not available": "APOP недоступна",
        "Command line too long": "Слишком длинная строка команды",
        "Unsupported authentication mechanism": "Механизм аутентификации не поддерживается",
        "Authentication cancelled": "Аутентификация отменена",
        "Invalid base64 data": "Неверные данные base64",
        "Authentication exchange too long": "Слишком длинный обмен аутентификации",
        "AUTH takes a mechanism and an optional initial response": "AUTH принимает механизм и необязательный начальный ответ",
        "Plaintext authentication is not allowed on this connection; use STLS first": "Вход с открытым паролем запрещён на этом соединении; сначала STLS",
    },
    nouns={
        "message": ("сообщение", "сообщения", "сообщений"),
        "octet": ("октет", "октета", "октетов"),
    },
)

#: The languages LANG offers, by tag, in listing order.
LANGUAGES: dict[str, Language] = {lang.tag: lang for lang in (ENGLISH, RUSSIAN)}

DEFAULT_LANGUAGE = ENGLISH


def negotiate(requested: str, default: Language = DEFAULT_LANGUAGE) -> Language | None:
    """
    The language for a LANG argument: C{*} is the default; otherwise the
    first offered tag the range matches (RFC 4647 basic filtering, either
    way round: C{ru-RU} picks C{ru}, C{en} picks C{en}). None if nothing fits.
    """
    if requested == "*":
        return default
    wanted = requested.lower()
    for tag, lang in LANGUAGES.items():
        if wanted == tag or wanted.startswith(tag + "-") or tag.startswith(wanted + "-"):
            return lang
    return None
